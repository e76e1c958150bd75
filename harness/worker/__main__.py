"""Entry point of every rank: `python -m harness.worker --stage <stage.json> [--stage <next stage.json> ...]`."""
import argparse
import json
import os
import socket
from pathlib import Path

from harness.records import StageDir
from harness.records.environment import SECRETS_FILE_VAR
from harness.worker import heartbeat


def _map_slurm_env() -> None:
    """`deepspeed --launcher slurm` runs `srun python ...` without RANK/WORLD_SIZE/LOCAL_RANK
    (DeepSpeed 0.19.8): take them from SLURM's variables."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]


def _load_secrets() -> None:
    """Ranks started over pdsh find their secrets (W&B key, tokens) in a file only the user can
    read, named by HARNESS_SECRETS_FILE: the launch side keeps them off the logged pdsh command
    line and out of the run folder (harness/launch/processes.py). Called before anything imports wandb."""
    path = os.environ.get(SECRETS_FILE_VAR)
    if not path:
        return
    try:
        secrets = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"[harness] {socket.gethostname()}: secrets file {path} not found: it must be on a file system "
                         "every node sees (the home folder, or XDG_CACHE_HOME set to a shared folder)") from None
    os.environ.update(secrets)
    if os.environ.get("LOCAL_RANK") == "0":  # one line per node
        print(f"[harness] {socket.gethostname()}: secrets {' '.join(sorted(secrets))} read from {path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.worker")
    parser.add_argument("--stage", type=Path, action="append", required=True,
                        help="a stage.json the orchestrator wrote; several run one after the other in this launch")
    parser.add_argument("--local_rank", type=int, default=None, help="passed by the deepspeed launcher")
    args = parser.parse_args()
    _map_slurm_env()
    _load_secrets()
    heartbeat.start(StageDir(args.stage[0].parent), int(os.environ.get("RANK", "0")))
    from harness.worker.train import run_launch  # after the env is complete: importing deepspeed (and wandb) reads it

    run_launch(args.stage)


if __name__ == "__main__":
    main()
