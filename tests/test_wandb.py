"""W&B monitoring with the real wandb library in offline mode, through real `harness run`
launches (deepspeed launcher, CPU ranks) and, for the cheap cases, start_monitor in-process.

The offline run files are read back with wandb's own protobufs (tests/wandb_records.py).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import finetune_phase, harness, make_plan, manifests, pretrain_phase, write_plan
from harness.stages.ds_config import get_train_ds_config
from harness.records import RunDir
from harness.launch.setup import count_train_rows
from harness.plan import BUILTIN_CONFIGS, load_plan
from harness.stages import expand_stages
from harness.launch.wandb_mode import resolve_mode
from harness.worker.monitor import NullMonitor, WandbMonitor, start_monitor

sys.path.insert(0, str(Path(__file__).parent))
from wandb_records import offline_runs, read_run  # noqa: E402

OFFLINE = {"mode": "offline", "project": "harness-test", "tags": ["ci"]}
WARNING = "[harness] warning: W&B off for stage"


def global_steps(run) -> list[int]:
    return [row["global_step"] for row in run.history]


@pytest.fixture(scope="module")
def two_phase_run(tmp_path_factory) -> Path:
    """pretrain on 2 ranks (ZeRO-2), then finetune on 1 rank (ZeRO-0), 6 steps each, W&B offline."""
    folder = tmp_path_factory.mktemp("wandb-two-phase")
    plan = make_plan("wbtwo", [
        pretrain_phase("pretrain", zero_stage=2, checkpoint_every=3, eval_every=3),
        finetune_phase("finetune", zero_stage=0, procs_per_node=1, eval_every=3),
    ], port=29810, wandb=OFFLINE)
    out = folder / "run"
    harness("run", write_plan(folder, plan), "--out", out, check=True)
    return out


def test_one_grouped_run_per_stage(two_phase_run):
    out = two_phase_run
    pre, fine = runs = offline_runs(out / "wandb")
    assert len(runs) == 2  # 2 ranks in phase 1, still one W&B run for it
    assert not list((out / "phases").glob("*/wandb"))  # nothing written in a stage's working folder
    key = RunDir(out).wandb_key.read_text().strip()
    assert [r.id for r in runs] == [f"wbtwo-{key}-s00", f"wbtwo-{key}-s01"]
    assert [m["wandb_run_id"] for m in manifests(out)] == [r.id for r in runs]
    assert {r.group for r in runs} == {f"wbtwo-{key}"}
    assert {r.project for r in runs} == {"harness-test"}
    assert (pre.name, pre.job_type, fine.name, fine.job_type) == ("pretrain", "pretrain", "finetune", "finetune")
    assert pre.tags == ["ci"] and pre.exit_code == 0 and fine.exit_code == 0

    for run, stage_dir in zip(runs, RunDir(out).stage_dirs()):
        # The exact DeepSpeed config the worker used, and the resolved stage.
        assert run.config["deepspeed"] == json.loads(stage_dir.ds_config.read_text())
        assert run.config["name"] == run.name and run.config["settings"]["seq_len"] in (48, 64)
    assert (pre.config["zero_stage"], pre.config["world_size"]) == (2, 2)
    assert (fine.config["zero_stage"], fine.config["world_size"]) == (0, 1)

    # One global step axis across phases; stage_step restarts; W&B's own step follows global_step.
    steps = global_steps(pre) + global_steps(fine)
    assert steps == list(range(1, 13))
    assert [row["stage_step"] for row in fine.history] == list(range(1, 7))
    assert all(row["_step"] == row["global_step"] for row in pre.history + fine.history)
    rows = pre.history[-1]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s", "train/eta_stage_s", "train/eta_plan_s",
            "eval/loss", "eval/ppl"} <= set(rows)
    assert "eval/exact_match" in fine.history[-1]
    assert "stage" not in rows  # strings stay in metrics.jsonl; the config has them


def test_resumed_stage_continues_its_run(two_phase_run):
    """Stage 0 as if killed after its step-3 checkpoint: no manifest, no model, no later checkpoint."""
    out = two_phase_run
    stage = RunDir(out).stage_dirs()[0]
    first_id = json.loads(stage.manifest.read_text())["wandb_run_id"]
    stage.manifest.unlink()
    for file in stage.model.iterdir():
        file.unlink()
    stage.model.rmdir()
    for tag in stage.checkpoints.glob("step*"):
        if int(tag.name.removeprefix("step")) > 3:
            shutil.rmtree(tag)
    assert stage.latest_checkpoint() == "step3"

    result = harness("run", out / "plan.yaml", "--out", out, check=True)
    assert "stage 01 finetune: done, skipped" in result.stdout

    runs = offline_runs(out / "wandb")
    assert len(runs) == 3 and len({r.id for r in runs}) == 2  # a new segment, no new run
    before, resumed = [r for r in runs if r.id == first_id]
    assert resumed.group == before.group and resumed.name == "pretrain"
    assert global_steps(before) == [1, 2, 3, 4, 5, 6]
    assert global_steps(resumed) == [4, 5, 6]  # continues after the checkpoint
    assert json.loads(stage.manifest.read_text())["wandb_run_id"] == first_id


def test_wandb_failure_does_not_stop_training(tmp_path, monkeypatch):
    """A real wandb error on rank 0 (its settings reject the base URL): one warning, a full stage."""
    plan = make_plan("wbfail", [pretrain_phase("pretrain", steps=3, zero_stage=0)], port=29820, procs=1, wandb=OFFLINE)
    monkeypatch.setenv("WANDB_BASE_URL", "not a url")
    result = harness("run", write_plan(tmp_path, plan), "--out", tmp_path / "run", check=True)
    warnings = [line for line in result.stdout.splitlines() if line.startswith(WARNING)]
    assert len(warnings) == 1 and "base_url" in warnings[0], result.stdout[-3000:]
    [manifest] = manifests(tmp_path / "run")
    assert manifest["stage_steps"] == 3 and manifest["wandb_run_id"] is None
    assert not list((tmp_path / "run").rglob("run-*.wandb"))


def test_deepspeed_wandb_monitor_is_adopted(tmp_path, monkeypatch):
    """DeepSpeed's own wandb block opens a run in deepspeed.initialize; ours goes into it: one run."""
    ds_wandb = {"wandb": {"enabled": True, "project": "harness-test", "group": "ds-group"}}
    plan = make_plan("wbds", [pretrain_phase("pretrain", steps=4, zero_stage=0, deepspeed=ds_wandb)],
                     port=29830, procs=1, wandb=OFFLINE)
    monkeypatch.setenv("WANDB_MODE", "offline")  # DeepSpeed's wandb.init takes its mode from the env
    out = tmp_path / "run"
    harness("run", write_plan(tmp_path, plan), "--out", out, check=True)
    files = list(out.rglob("run-*.wandb"))
    assert len(files) == 1
    run = read_run(files[0])
    assert run.group == "ds-group" and run.name == "pretrain" and run.exit_code == 0
    assert manifests(out)[0]["wandb_run_id"] == run.id
    assert run.config["deepspeed"]["wandb"]["enabled"] is True
    ours = [row for row in run.history if "train/loss" in row]
    assert [row["global_step"] for row in ours] == [1, 2, 3, 4]
    assert any("Train/Samples/lr" in row for row in run.history)  # DeepSpeed's own events


# ---- in-process: start_monitor itself (no launcher) ---------------------------------------

def one_stage(tmp_path: Path, **wandb):
    plan = make_plan("wbunit", [pretrain_phase("pretrain", steps=4)], port=29740, wandb={**OFFLINE, **wandb})
    loaded = load_plan(write_plan(tmp_path, plan))
    [stage] = expand_stages(loaded, "cpu", count_train_rows, BUILTIN_CONFIGS["tiny-llama"], wandb_mode=resolve_mode(loaded.wandb.mode))
    run = RunDir(tmp_path / "run")
    stage_dir = run.stage(stage.index, stage.name)
    stage_dir.root.mkdir(parents=True)
    stage_dir.ds_config.write_text(json.dumps(get_train_ds_config(stage)))
    return stage, run, stage_dir


def row(step: int, **extra) -> dict:
    return {"stage": "pretrain", "global_step": step, "stage_step": step, "train/loss": 1.0 / step, "train/grad_norm": None, **extra}


def test_log_every_and_model_reference(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    stage, run, stage_dir = one_stage(tmp_path, log_every=2, log_model=True)
    monitor = start_monitor(stage, run, stage_dir)
    assert isinstance(monitor, WandbMonitor)
    for step in range(1, 5):
        monitor.log(row(step, **({"eval/loss": 2.0} if step == 3 else {})))
    model = stage_dir.model
    model.mkdir()
    (model / "config.json").write_text("{}")
    monitor.log_model(model)
    monitor.close()
    [logged] = offline_runs(run.root / "wandb")
    assert logged.id == monitor.run_id
    assert global_steps(logged) == [2, 3, 4]  # every 2nd, the eval row, the last row
    assert "train/grad_norm" not in logged.history[0]  # None is not logged
    [artifact] = logged.artifacts
    assert (artifact.type, artifact.name) == ("model", f"model-{monitor.run_id}")
    [entry] = artifact.manifest.contents
    assert entry.path == "model/config.json" and entry.ref == (model / "config.json").resolve().as_uri()

    # Same stage again (a requeue): same id, same key file.
    again = start_monitor(stage, run, stage_dir)
    assert again.run_id == monitor.run_id
    again.close()


def test_unusable_wandb_folder_gives_null_monitor(tmp_path, capsys):
    """wandb itself would fall back to /tmp; the harness refuses and trains on without W&B."""
    stage, run, stage_dir = one_stage(tmp_path)
    (run.root / "wandb").write_text("a file where the W&B folder should be")
    monitor = start_monitor(stage, run, stage_dir)
    assert type(monitor) is NullMonitor and monitor.run_id is None
    monitor.log(row(1))
    monitor.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(WARNING) and "FileExistsError" in lines[0]


def test_disabled_starts_nothing(tmp_path):
    stage, run, stage_dir = one_stage(tmp_path, mode="disabled")
    assert type(start_monitor(stage, run, stage_dir)) is NullMonitor
    assert not (run.root / "wandb").exists()


def test_auto_mode(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert resolve_mode("auto", {"HOME": str(home)}) == "offline"
    assert resolve_mode("auto", {"HOME": str(home), "WANDB_API_KEY": "x" * 40}) == "online"
    assert resolve_mode("auto", {"HOME": str(home), "WANDB_MODE": "disabled", "WANDB_API_KEY": "x"}) == "disabled"
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert resolve_mode("auto", {"HOME": str(home)}) == "online"
    assert resolve_mode("auto", {"HOME": str(home), "WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"
    assert resolve_mode("offline", {"HOME": str(home), "WANDB_API_KEY": "x"}) == "offline"
