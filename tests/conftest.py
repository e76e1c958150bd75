"""Shared test setup: real DeepSpeed on CPU ranks, one JIT cache per machine, plan writing helpers."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "plans" / "data"
PRETRAIN_TEXT = DATA / "pretrain.txt"
FINETUNE_JSONL = DATA / "finetune.jsonl"

# DeepSpeed JIT-builds its CPU shm op on first init (25-50 s); one cache for every test run.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/harness-test-torch-ext")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["DS_ACCELERATOR"] = "cpu"
# Token stores of the tests' plans: shared by every test (the plans/data stores are built once).
TOKEN_CACHE = "/tmp/harness-test-token-cache"


def make_plan(name: str, phases: list[dict], *, port: int, procs: int = 2, **top) -> dict:
    """A small CPU plan: tiny Llama, byte tokenizer, local launcher, W&B off unless given."""
    plan = {
        "name": name,
        "model": {"builtin": "tiny-llama"},
        "cluster": {"launcher": "local", "accelerator": "cpu", "procs_per_node": procs, "master_port": port},
        "wandb": {"mode": "disabled"},
        "cache_dir": TOKEN_CACHE,
        "defaults": {"seq_len": 64, "micro_batch": 4, "eval_every": 1000, "eval_batches": 2, "checkpoint_every": 1000,
                     "optimizer": {"type": "AdamW", "lr": 3e-3}, "scheduler": {"type": "WarmupLR", "warmup_ratio": 0.1}},
        "phases": phases,
    }
    plan.update(top)
    return plan


def pretrain_phase(name: str, **settings) -> dict:
    return {"name": name, "kind": "pretrain", "data": {"files": [str(PRETRAIN_TEXT)]}, "steps": 6, **settings}


def finetune_phase(name: str, **settings) -> dict:
    return {"name": name, "kind": "finetune", "data": {"files": [str(FINETUNE_JSONL)]}, "steps": 6, "seq_len": 48, **settings}


def write_plan(folder: Path, plan: dict, filename: str = "plan.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def harness(*args: str, timeout: float = 600, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `harness` command line as a user would, in its own process."""
    result = subprocess.run([sys.executable, "-m", "harness.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"harness {' '.join(map(str, args))} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run the `harness` command line in this process (its `main`, as the console script calls it):
    for commands that launch nothing (refusals, `plan`), it saves starting an interpreter each time.
    An exception that escapes main fails the test, as a traceback would fail a user."""
    from harness.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in args])
    result = subprocess.CompletedProcess(["harness", *map(str, args)], code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f"harness {' '.join(map(str, args))} exited {code}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def manifests(out: Path) -> list[dict]:
    return [json.loads((d / "manifest.json").read_text()) for d in sorted((out / "phases").iterdir())]


def metric_rows(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "run"


def pytest_collection_modifyitems(items) -> None:
    """A test that uses the local SLURM cluster / sshd (tests/cluster.py) is marked `cluster`."""
    for item in items:
        if "local_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
