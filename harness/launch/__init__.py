"""The launch side: everything between `harness run` (or `submit`) and the ranks, never importing
torch.

    setup.py         validate a plan and bind it to a run folder; write each stage's files
    orchestrator.py  the run order: launch after launch, judged by exit code and manifest
    processes.py     one launch's process group: start, stream, stop (only what it started)
    command.py       the `deepspeed` launcher's argv and the ranks' environment
    hosts.py         the hosts of a launch (hostfile, host list, SLURM allocation), local GPUs
    slurm.py         `harness submit`: sbatch jobs chained afterok, and their states
    resume.py        what a resume needs on disk before the launch
    failures.py      why a stage failed, said so the user knows what to do next
    jobs.py          the child programs that need torch (harness/jobs)
    wandb_mode.py    which W&B mode a run uses, resolved once here
"""
