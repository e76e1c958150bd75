"""LoRA stages interrupted and resumed, as full stages are (tests/test_swap.py, test_elastic_resume.py):

  00 sft       ZeRO-3 on 2 ranks, LoRA r=8 on every linear layer
  01 sft-more  the same adapter -> full_state: adapters and their moments carried

The uninterrupted run swaps between the stages in one launch. The interrupted run loses rank 1
after step 5 of sft (its checkpoint: step4); the rerun relaunches per stage and takes a stop
request (what SLURM preemption sends: the sbatch script touches the stop file on USR1) in
sft-more; the last rerun finishes. It must end with the uninterrupted run's weights and
moments, step for step. Copies of the killed run, rerun:
- on 1 rank (2 accumulation steps for the same global batch): a universal checkpoint with the
  adapters' moments, then the uninterrupted run's losses;
- at ZeRO-2 (another ZeRO family): the merged weights of step4 under a fresh adapter, which
  computes the same first loss as the uninterrupted run.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from conftest import FINETUNE_JSONL, harness, make_plan, manifests, metric_rows, write_plan
from harness.records import Manifest, StageDir
from harness.records.exit_codes import PREEMPTED
from test_resume import wait_for

pytestmark = pytest.mark.slow  # five DeepSpeed launches: left out of the developer loop

STAGES = ["00-sft", "01-sft-more"]
ADAPTER = {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["all-linear"], "modules_to_save": ["head"]}


def lora_plan(port: int, transitions: str = "swap", procs: int = 2, zero_stage: int = 3) -> dict:
    """Two lr groups (the head's copy at lr x 0.1): a resume must keep each group's own."""
    lora = {"kind": "finetune", "data": {"files": [str(FINETUNE_JSONL)]}, "seq_len": 48, "zero_stage": zero_stage, "global_batch": 8,
            "checkpoint_every": 2, "trainable": {"adapter": ADAPTER, "lr_scale": {"head": 0.1}}}
    plan = make_plan("lora-resume", [{"name": "sft", "steps": 6, **lora}, {"name": "sft-more", "steps": 6, **lora}], port=port, procs=procs)
    plan["cluster"]["transitions"] = transitions
    return plan


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lora-whole")
    result = harness("run", write_plan(folder, lora_plan(30600)), "--out", folder / "run", check=True)
    assert "stages 00-01 share one launch on 2 rank(s)" in result.stdout
    return folder / "run"


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("lora-interrupted")
    out = folder / "run"
    killed = harness("run", write_plan(folder, lora_plan(30610)), "--out", out, env={**os.environ, "HARNESS_FAULT": "sft:step5:1"})
    checkpoint_after_kill = StageDir(out / "phases" / STAGES[0]).latest_checkpoint()
    shutil.copytree(out, folder / "killed")

    stop_file, second = folder / "stop", out / "phases" / STAGES[1]

    def stop_when_sft_more_begins():
        wait_for(lambda: len(list((second / "ranks").glob("rank*.json"))) == 2, 300, "sft-more to begin")
        stop_file.touch()

    toucher = threading.Thread(target=stop_when_sft_more_begins, daemon=True)
    toucher.start()
    relaunch_plan = write_plan(folder, lora_plan(30610, transitions="relaunch"), "relaunch.yaml")
    stopped = harness("run", relaunch_plan, "--out", out, "--force", env={**os.environ, "HARNESS_STOP_FILE": str(stop_file)})
    toucher.join(timeout=10)
    stop_checkpoint = StageDir(second).latest_checkpoint()
    final = harness("run", relaunch_plan, "--out", out, "--force", check=True)
    return {"out": out, "killed": killed, "checkpoint_after_kill": checkpoint_after_kill, "stopped": stopped,
            "stop_checkpoint": stop_checkpoint, "final": final, "killed_copy": folder / "killed"}


def test_a_killed_then_stopped_lora_run_ends_with_the_uninterrupted_weights_and_moments(interrupted: dict, uninterrupted: Path):
    assert interrupted["killed"].returncode == 1 and "stage 00 'sft'" in interrupted["killed"].stderr
    assert interrupted["checkpoint_after_kill"] == "step4"
    stopped = interrupted["stopped"]
    assert stopped.returncode == PREEMPTED, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "stage sft: resuming from checkpoint step4 (native" in stopped.stdout
    tag = interrupted["stop_checkpoint"]
    assert tag is not None and 1 <= int(tag.removeprefix("step")) < 6, "the stop saved a checkpoint mid-stage"
    assert f"stage sft-more: resuming from checkpoint {tag} (native" in interrupted["final"].stdout

    resumed, whole = manifests(interrupted["out"]), manifests(uninterrupted)
    assert [m["load"]["mode"] for m in resumed] == [m["load"]["mode"] for m in whole] == ["init", "full_state"]
    assert resumed[1]["start_optimizer_state_digest"] == resumed[0]["optimizer_state_digest"] != "empty", "adapter moments carried over a relaunch"
    assert [m["weights_digest"] for m in resumed] == [m["weights_digest"] for m in whole]
    assert [m["optimizer_state_digest"] for m in resumed] == [m["optimizer_state_digest"] for m in whole]
    assert [m["trainable"]["frozen_digest_end"] for m in resumed] == [m["trainable"]["frozen_digest_start"] for m in whole], "the base untouched"
    for name in STAGES:
        steps = [r["stage_step"] for r in metric_rows(interrupted["out"] / "phases" / name)]
        assert steps == list(range(1, 7)), f"{name}: every step logged once"
        adapter = (interrupted["out"] / "phases" / name / "adapter" / "adapter_model.safetensors").read_bytes()
        assert adapter == (uninterrupted / "phases" / name / "adapter" / "adapter_model.safetensors").read_bytes()


def losses(out: Path) -> list[float]:
    return [row["train/loss"] for name in STAGES for row in metric_rows(out / "phases" / name)]


def rerun_killed(interrupted: dict, tmp_path: Path, plan: dict) -> Path:
    out = tmp_path / "run"
    shutil.copytree(interrupted["killed_copy"], out)
    harness("run", write_plan(tmp_path, plan), "--out", out, "--force", check=True)
    return out


def test_a_killed_lora_stage_resumes_on_another_world_size_with_its_adapters_moments(interrupted: dict, uninterrupted: Path, tmp_path: Path):
    out = rerun_killed(interrupted, tmp_path, lora_plan(30620, procs=1))

    stage = StageDir(out / "phases" / STAGES[0])
    (universal,) = Manifest.read(stage.manifest).resumes
    (native,) = Manifest.read(StageDir(interrupted["out"] / "phases" / STAGES[0]).manifest).resumes
    assert (universal.mode, universal.tag, universal.world_size) == ("universal", "step4", 1)
    assert universal.optimizer_state_carried, "the adapters' Adam moments came with the universal checkpoint"
    assert universal.weights_digest == native.weights_digest, "the weights of step4 as the 2 ranks load it natively"
    assert [r["stage_step"] for r in metric_rows(stage.root)] == list(range(1, 7))
    # Moments, Adam's step count and each lr group's own rate carried; 2 accumulation steps on 1 rank
    # train as 2 ranks do: the run goes on as the uninterrupted one, to float rounding.
    assert losses(out) == pytest.approx(losses(uninterrupted), rel=1e-5)
    second = json.loads((out / "phases" / STAGES[1] / "manifest.json").read_text())
    assert second["load"]["mode"] == "full_state" and second["engine"]["world_size"] == 1
    assert second["trainable"]["frozen_digest_start"] == second["trainable"]["frozen_digest_end"]


def test_a_killed_lora_stage_resumed_at_another_zero_stage_starts_a_fresh_adapter_on_its_merged_weights(interrupted: dict, uninterrupted: Path,
                                                                                                      tmp_path: Path):
    out = rerun_killed(interrupted, tmp_path, lora_plan(30630, zero_stage=2))

    (resume,) = Manifest.read(StageDir(out / "phases" / STAGES[0]).manifest).resumes
    assert (resume.mode, resume.tag) == ("consolidated", "step4") and not resume.optimizer_state_carried
    # A fresh adapter (B = 0) on step4's merged weights computes what the adapted model computed.
    assert losses(out)[:5] == pytest.approx(losses(uninterrupted)[:5], rel=1e-6)
    assert losses(out)[5] != pytest.approx(losses(uninterrupted)[5], rel=1e-6), "a fresh optimizer: step 6 moves otherwise"
    assert [r["stage_step"] for r in metric_rows(out / "phases" / STAGES[0])] == list(range(1, 7))
