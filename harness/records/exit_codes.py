"""Exit codes the worker returns and the launch side (orchestrator, sbatch script) acts on."""

# A rank was asked to stop (SIGUSR1: SLURM preemption or time limit), finished its step and
# saved a checkpoint: rerun (or requeue) to resume. 75 is EX_TEMPFAIL from sysexits.h.
PREEMPTED = 75
