"""Secrets never land in the run folder: real launches (local, and pdsh over the loopback sshd)
with a fake W&B key in the environment, W&B offline; then every byte under the run folder is
searched for the key, and every env file the harness wrote must be readable by its owner only."""
from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path

from cluster import local_cluster  # noqa: F401  (fixture)
from conftest import REPO, make_plan, pretrain_phase, write_plan
from harness.launch.command import deepspeed_env_file, launcher_environment
from harness.plan import is_secret
from harness.records.environment import SECRETS_FILE_VAR
from test_cluster import rank_records, two_node_plan

OFFLINE = {"mode": "offline", "project": "harness-test"}
# wandb accepts only 40-character keys; this one is random so no other file holds it by chance.
FAKE_KEY = "fake-secret-" + secrets.token_hex(14)


def test_which_variables_are_secrets_and_where_they_may_go():
    assert all(map(is_secret, ["WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD"]))
    assert not any(map(is_secret, ["TOKENIZERS_PARALLELISM", SECRETS_FILE_VAR, "PATH", "WANDB_MODE"]))
    ranks = {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}
    assert deepspeed_env_file(ranks) == "WANDB_MODE=offline\n"
    base = {"PATH": "/bin", "MLFLOW_TRACKING_TOKEN": "t"}
    # The slurm runner logs MLFLOW* variables in srun --export; srun hands the rest to the ranks.
    assert launcher_environment("slurm", base, ranks) == {"PATH": "/bin", **ranks}
    assert launcher_environment("pdsh", base, ranks) == {"PATH": "/bin", "WANDB_MODE": "offline"}
    assert launcher_environment("local", base, ranks) == {**base, **ranks}


def files_holding(folder: Path, needle: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def initial_environment(pid: int) -> dict[str, str]:
    """The environment a process was started with."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def run_watching_ranks(plan: Path, out: Path, env: dict[str, str], ranks: int, secrets_dir: Path) -> tuple[list[dict], dict[Path, tuple[int, str]]]:
    """`harness run` to the end. While its only stage trains: each rank's starting environment
    and the secrets files (mode, text) there are."""
    stage = out / "phases" / "00-pre"
    run = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", plan, "--out", out], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while len(rank_records(stage) if (stage / "ranks").is_dir() else []) < ranks:
            assert run.poll() is None, run.stdout.read()[-3000:]
            time.sleep(0.1)
        environments = [initial_environment(r["pid"]) for r in rank_records(stage)]
        files = {p: (mode(p), p.read_text()) for p in secrets_dir.glob("*")} if secrets_dir.is_dir() else {}
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output[-3000:]
    finally:
        run.kill()
    return environments, files


def assert_nothing_leaked(out: Path) -> None:
    assert files_holding(out, FAKE_KEY) == []
    env_files = list(out.rglob(".deepspeed_env"))
    assert env_files and {mode(p) for p in env_files} == {0o600}
    [offline_run] = (out / "wandb").glob("offline-run-*")  # W&B ran, so its files were searched too
    assert list(offline_run.rglob("*.wandb"))


def test_local_ranks_get_the_key_from_the_environment_only(tmp_path):
    plan = make_plan("secrets", [pretrain_phase("pre", steps=12, zero_stage=0)], port=29870, wandb=OFFLINE)
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    env = {**os.environ, "WANDB_API_KEY": FAKE_KEY, "XDG_CACHE_HOME": str(cache)}
    environments, secrets_files = run_watching_ranks(write_plan(tmp_path, plan), out, env, 2, cache / "harness" / "secrets")
    assert [e.get("WANDB_API_KEY") for e in environments] == [FAKE_KEY, FAKE_KEY]
    assert secrets_files == {}
    assert_nothing_leaked(out)


def test_pdsh_ranks_read_the_key_from_a_private_file_outside_the_run(local_cluster, tmp_path):
    plan = two_node_plan("secrets-pdsh", "pdsh", 29880, [pretrain_phase("pre", steps=12, zero_stage=0)], local_cluster.hosts)
    plan["wandb"] = OFFLINE
    out = tmp_path / "run"
    cache = tmp_path / "cache"  # loopback "nodes" share this machine's file system
    env = local_cluster.env(WANDB_API_KEY=FAKE_KEY, XDG_CACHE_HOME=str(cache))
    secrets_dir = cache / "harness" / "secrets"
    environments, secrets_files = run_watching_ranks(write_plan(tmp_path, plan), out, env, 2, secrets_dir)

    [(path, (file_mode, text))] = secrets_files.items()
    assert file_mode == 0o600 and json.loads(text) == {"WANDB_API_KEY": FAKE_KEY}
    # Started over ssh with only what .deepspeed_env holds: the file's name, not the key.
    assert all(e[SECRETS_FILE_VAR] == str(path) and "WANDB_API_KEY" not in e for e in environments)
    log = (out / "phases" / "00-pre" / "launcher.log").read_text()
    loaded = [line.split(":")[0] for line in log.splitlines() if line.endswith(f"secrets WANDB_API_KEY read from {path}")]
    assert sorted(loaded) == local_cluster.hosts  # pdsh prefixes each line with its host
    assert not path.exists(), "removed when the launch ended"
    assert_nothing_leaked(out)
