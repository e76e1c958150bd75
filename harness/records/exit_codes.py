"""Exit codes the worker returns and the launch side (orchestrator, failure messages, sbatch script) acts on."""

# A rank was asked to stop (SIGUSR1: SLURM preemption or time limit), finished its step and
# saved a checkpoint: rerun (or requeue) to resume. 75 is EX_TEMPFAIL from sysexits.h.
PREEMPTED = 75

# The loss was not finite for nonfinite_steps steps in a row (or at the stage's last step); the
# ranks stopped without saving that state (ranks/nonfinite.json says where). 65 is EX_DATAERR.
NONFINITE_LOSS = 65

# A checkpoint or the handoff could not be written: no space left on its disk (ENOSPC) or the
# user's quota is used up (EDQUOT). Nothing half-written is marked complete. 74 is EX_IOERR.
DISK_FULL = 74
