"""phased-harness: train language models in phases with DeepSpeed (see README.md).

Launch side (no torch): plan -> stages -> ds_config -> launch -> orchestrator / slurm.
Rank side: harness.worker, started by the `deepspeed` launcher on every rank.
"""

__version__ = "0.1.0"
