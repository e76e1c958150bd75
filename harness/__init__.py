"""phased-harness: train language models in phases with DeepSpeed (see README.md).

One folder per concern, each importing only the layers below it (tests/test_layout.py):

    plan/        what the user wrote: the schema, loading and checking a plan file
    records/     what crosses a process boundary: run-folder layout, typed records, formats
    objectives/  what a phase optimizes, launch side: rows it reads, token-store records it makes
    stages/      what each stage will do: pure rules `harness plan` shows and stage.json carries
    launch/      the launch side: setup, run order, processes, hosts, SLURM (never imports torch)
    views/       reading a run folder: status, report, tables
    worker/      the rank side: what the `deepspeed` launcher starts on every rank
    jobs/        child programs of the launch side that need torch
    cli.py       the `harness` command table

plan <- records <- objectives <- stages <- {launch, views, worker} <- {jobs, cli}; torch, DeepSpeed
and transformers only in worker/ and jobs/. docs/ARCHITECTURE.md draws it.
"""

__version__ = "0.1.0"
