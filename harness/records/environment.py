"""Environment variables the launch side sets for the ranks (besides DeepSpeed's own)."""

SECRETS_FILE_VAR = "HARNESS_SECRETS_FILE"
"""pdsh launches: the private file the ranks read their secrets from (harness/launch/processes.py)."""
STOP_FILE_VAR = "HARNESS_STOP_FILE"
"""SLURM jobs: a file the batch script touches on SIGUSR1; the ranks checkpoint and stop (templates/stage.sbatch)."""
FAULT_VAR = "HARNESS_FAULT"
"""`<stage name>:<point>:<rank>`: that rank SIGKILLs itself there (harness/worker/faults.py)."""
