"""A stage that fails mid-way stops the run with a message naming it; rerunning the same
command resumes from the latest checkpoint and finishes with no step missing or repeated."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.records import StageDir

from conftest import REPO, finetune_phase, harness, make_plan, manifests, metric_rows, pretrain_phase, write_plan

pytestmark = pytest.mark.slow  # several DeepSpeed launches per test: left out of the developer loop

STEPS = 200


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_rank_fails_the_stage_and_a_rerun_resumes_it(tmp_path: Path):
    plan = make_plan("killed", [
        pretrain_phase("long", steps=STEPS, checkpoint_every=10),
        finetune_phase("after", steps=4),
    ], port=29640)
    plan_path, out = write_plan(tmp_path, plan), tmp_path / "run"
    stage = out / "phases" / "00-long"
    run = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", plan_path, "--out", out], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: StageDir(stage).latest_checkpoint(), 180, "a first complete checkpoint")
    rank1 = json.loads((stage / "ranks" / "rank1.json").read_text())["pid"]
    os.kill(rank1, signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=120)

    assert run.returncode == 1
    assert "stage 00 'long'" in stderr and str(stage / "launcher.log") in stderr
    assert not (stage / "manifest.json").exists()
    assert not (out / "phases" / "01-after" / "manifest.json").exists()
    resume_tag = StageDir(stage).latest_checkpoint()
    assert 10 <= int(resume_tag.removeprefix("step")) < STEPS
    assert "interrupted" in harness("status", out, check=True).stdout

    rerun = harness("run", plan_path, "--out", out, check=True)
    assert f"stage long: resuming from checkpoint {resume_tag}" in rerun.stdout
    long, after = manifests(out)
    assert long["stage_steps"] == STEPS and after["global_step_end"] == STEPS + 4
    steps = [r["stage_step"] for r in metric_rows(stage)]
    assert steps == list(range(1, STEPS + 1)), "each step logged once: none lost, none repeated"
    (key,) = long["data_position"]
    assert long["data_position"][key] == STEPS * 8, "the data position continued from the checkpoint"
    assert long["load"]["mode"] == "init", "the resume keeps the stage's original handoff record"


def test_rank_that_raises_names_the_stage_and_rerun_completes(tmp_path: Path):
    plan = make_plan("raises", [pretrain_phase("pre", steps=3), finetune_phase("sft", steps=3)], port=29650, cache_dir=str(tmp_path / "cache"))
    plan_path, out = write_plan(tmp_path, plan), tmp_path / "run"
    harness("tokenize", plan_path, check=True)
    (tokens,) = (tmp_path / "cache" / "tokens").glob("finetune-*/tokens.bin")
    intact = tokens.read_bytes()
    tokens.write_bytes(intact[: len(intact) // 2])  # damaged after it was built: only the ranks read it

    failed = harness("run", plan_path, "--out", out)
    assert failed.returncode == 1
    assert "stage 01 'sft' (phase 'sft') failed" in failed.stderr
    assert f"token store damaged: {tokens}" in (out / "phases" / "01-sft" / "launcher.log").read_text()
    assert (out / "phases" / "00-pre" / "manifest.json").exists()

    tokens.write_bytes(intact)  # the user restores the file
    rerun = harness("run", plan_path, "--out", out, check=True)
    assert "stage 00 pre: done, skipped" in rerun.stdout
    assert [m["stage"] for m in manifests(out)] == ["pre", "sft"]
