"""Entry point of every rank: `python -m harness.worker --stage <stage.json>`."""
import argparse
import os
from pathlib import Path


def _map_slurm_env() -> None:
    """`deepspeed --launcher slurm` runs `srun python ...` without RANK/WORLD_SIZE/LOCAL_RANK
    (DeepSpeed 0.19.8): take them from SLURM's variables."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.worker")
    parser.add_argument("--stage", type=Path, required=True, help="the stage.json the orchestrator wrote")
    parser.add_argument("--local_rank", type=int, default=None, help="passed by the deepspeed launcher")
    args = parser.parse_args()
    _map_slurm_env()
    from harness.worker.train import run_stage  # after the env mapping: importing deepspeed reads it

    run_stage(args.stage)


if __name__ == "__main__":
    main()
