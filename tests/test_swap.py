"""Stages that share one launch (cluster.transitions: swap): the ranks hand off, tear the engine
down and build the next stage's engine in place, switching ZeRO stage and optimizer inside the
launch. Each stage still starts from exactly what the previous one saved, carries moments
where the load-mode rule says so, and ends with the weights a relaunch per stage gives. A rank
SIGKILLed inside the group, then a stop request (SLURM's USR1) inside the group, each resume
to the same final weights as the uninterrupted run."""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest

from conftest import FINETUNE_JSONL, PRETRAIN_TEXT, harness, make_plan, manifests, metric_rows, pretrain_phase, write_plan
from harness.records.exit_codes import PREEMPTED
from harness.records import StageDir
from harness.records import read_json_lines
from test_resume import wait_for

STAGES = ["00-pre", "01-ms.c1.s1-sgd", "02-ms.c1.s2-adamw", "03-ms.c1.s3-adamw", "04-ms.c1.s4-sgd-momentum"]
LOAD_MODES = ["init", "weights_only", "weights_only", "full_state", "weights_only"]
KILLED = "ms.c1.s2-adamw:step3:1"  # rank 1 dies after step 3 of stage 02 (its checkpoint: step2)
STOPPED = 3  # a stop request while stage 03 trains


def swap_plan(name: str, port: int, transitions: str = "swap") -> dict:
    multistep = {
        "name": "ms", "kind": "multistep", "cycles": 1, "seq_len": 48, "checkpoint_every": 2,
        "data": {"pretrain": {"files": [str(PRETRAIN_TEXT)]}, "finetune": {"files": [str(FINETUNE_JSONL)]}, "mix": "alternate"},
        "stages": [
            {"optimizer": {"type": "SGD", "lr": 0.05}, "steps": 4, "zero_stage": 2, "data": "pretrain"},
            {"optimizer": {"type": "AdamW", "lr": 2e-3}, "steps": 4, "zero_stage": 3, "data": "finetune"},
            {"optimizer": {"type": "AdamW", "lr": 1e-3}, "steps": 6, "zero_stage": 3, "data": "mix"},
            {"optimizer": {"type": "SGD", "lr": 0.05, "momentum": 0.9}, "steps": 3, "zero_stage": 1, "data": "mix"},
        ],
    }
    plan = make_plan(name, [pretrain_phase("pre", steps=4, zero_stage=2), multistep], port=port)
    plan["cluster"]["transitions"] = transitions
    return plan


def rank_pids(out: Path) -> list[tuple[int, int]]:
    """(rank 0 pid, rank 1 pid) each stage ran in."""
    return [tuple(json.loads((out / "phases" / s / "ranks" / f"rank{r}.json").read_text())["pid"] for r in (0, 1)) for s in STAGES]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("swap")
    out = folder / "run"
    result = harness("run", write_plan(folder, swap_plan("swap", 29670)), "--out", out, check=True)
    assert "stages 00-04 share one launch on 2 rank(s)" in result.stdout
    return out


@pytest.fixture(scope="module")
def relaunched(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("relaunch")
    out = folder / "run"
    result = harness("run", write_plan(folder, swap_plan("swap", 29680, "relaunch")), "--out", out, check=True)
    assert "share one launch" not in result.stdout
    return out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict:
    """The same plan: a rank SIGKILLed in stage 02, rerun; a stop request in stage 03, rerun to the end."""
    folder = tmp_path_factory.mktemp("interrupted")
    plan_path, out = write_plan(folder, swap_plan("swap", 29690)), folder / "run"
    killed = harness("run", plan_path, "--out", out, env={**os.environ, "HARNESS_FAULT": KILLED})
    after_kill = {s: StageDir(out / "phases" / s) for s in STAGES}
    done_after_kill = [(after_kill[s].manifest).exists() for s in STAGES]
    checkpoint_after_kill = after_kill[STAGES[2]].latest_checkpoint()

    stop_file = folder / "stop"
    stopped_stage = out / "phases" / STAGES[STOPPED]

    def stop_when_stage_begins():
        wait_for(lambda: len(list((stopped_stage / "ranks").glob("rank*.json"))) == 2, 300, f"stage {STOPPED:02d} to begin")
        stop_file.touch()

    toucher = threading.Thread(target=stop_when_stage_begins, daemon=True)
    toucher.start()
    stopped = harness("run", plan_path, "--out", out, env={**os.environ, "HARNESS_STOP_FILE": str(stop_file)})
    toucher.join(timeout=10)
    done_after_stop = [(out / "phases" / s / "manifest.json").exists() for s in STAGES]
    stop_checkpoint = StageDir(stopped_stage).latest_checkpoint()
    final = harness("run", plan_path, "--out", out, check=True)
    return {"out": out, "killed": killed, "done_after_kill": done_after_kill, "checkpoint_after_kill": checkpoint_after_kill,
            "stopped": stopped, "done_after_stop": done_after_stop, "stop_checkpoint": stop_checkpoint, "final": final}


def test_every_stage_runs_in_one_launch(uninterrupted: Path):
    pids = rank_pids(uninterrupted)
    assert len(set(pids)) == 1, f"one pair of rank processes for all 5 stages, got {pids}"


def test_each_stage_starts_from_what_the_previous_one_saved(uninterrupted: Path):
    records = manifests(uninterrupted)
    assert [m["load"]["mode"] for m in records] == LOAD_MODES
    assert [m["engine"]["zero_stage"] for m in records] == [2, 2, 3, 3, 1] and [m["engine"]["optimizer"] for m in records] == ["AdamW", "SGD", "AdamW", "AdamW", "SGD"]
    for before, after in zip(records, records[1:]):
        assert after["start_weights_digest"] == before["weights_digest"], after["stage"]
        if after["load"]["mode"] == "full_state":
            assert after["start_optimizer_state_digest"] == before["optimizer_state_digest"] != "empty", "moments carried"
        else:
            assert after["start_optimizer_state_digest"] == "empty", f"{after['stage']}: a fresh optimizer"


@pytest.mark.slow
def test_swapping_gives_the_weights_and_losses_of_a_relaunch_per_stage(uninterrupted: Path, relaunched: Path):
    assert len(set(rank_pids(relaunched))) == len(STAGES), "the relaunch run started fresh ranks for every stage"
    swapped, fresh = manifests(uninterrupted), manifests(relaunched)
    assert [m["weights_digest"] for m in swapped] == [m["weights_digest"] for m in fresh]
    assert [m["optimizer_state_digest"] for m in swapped] == [m["optimizer_state_digest"] for m in fresh]
    losses = lambda out: [(r["stage"], r["stage_step"], r["train/loss"]) for r in read_json_lines(out / "metrics.jsonl")]  # noqa: E731
    assert losses(uninterrupted) == losses(relaunched)
    status = lambda out: [re.sub(r"\s+", " ", line) for line in harness("status", out, check=True).stdout.splitlines()[1:]]  # noqa: E731
    assert status(uninterrupted) == status(relaunched), "harness status cannot tell how the stages were started"


def test_each_stage_keeps_its_own_log_memory_record_and_metrics(uninterrupted: Path):
    for name in STAGES:
        stage = StageDir(uninterrupted / "phases" / name)
        log = stage.launcher_log.read_text()
        assert re.search(rf"^\[harness\] stage {name[:2]} ", log, re.M), f"{name}'s own lines are in its launcher.log"
        assert not re.search(rf"^\[harness\] stage (?!{name[:2]} )\d\d ", log, re.M), f"no other stage's lines in {name}'s log"
        steps = len([r for r in metric_rows(stage.root)])
        assert steps == json.loads(stage.manifest.read_text())["stage_steps"]
        memory = json.loads(stage.rank_memory(1).read_text())
        assert {"before_model", "initialized", "end"} <= set(memory["milestones"]), name
        assert (stage.ranks / "end-rank1.txt").read_text().startswith("exit"), f"{name}: rank 1 left the stage normally"


@pytest.mark.slow
def test_a_rank_killed_inside_the_group_names_its_stage_and_the_rerun_resumes_it(interrupted: dict, uninterrupted: Path):
    killed = interrupted["killed"]
    assert killed.returncode == 1 and "stage 02 'ms.c1.s2-adamw'" in killed.stderr, killed.stderr[-3000:]
    assert "SIGKILL" in killed.stderr
    assert interrupted["done_after_kill"] == [True, True, False, False, False]
    assert interrupted["checkpoint_after_kill"] == "step2"
    assert "stage ms.c1.s2-adamw: resuming from checkpoint step2 (native" in interrupted["stopped"].stdout


@pytest.mark.slow
def test_a_stop_request_inside_the_group_checkpoints_and_the_rerun_resumes_it(interrupted: dict):
    stopped = interrupted["stopped"]
    assert stopped.returncode == PREEMPTED, f"{stopped.stdout[-3000:]}\n{stopped.stderr[-3000:]}"
    assert "stage 03 'ms.c1.s3-adamw'" in stopped.stderr and "preemption" in stopped.stderr
    assert interrupted["done_after_stop"] == [True, True, True, False, False]
    tag = interrupted["stop_checkpoint"]
    assert tag is not None and 1 <= int(tag.removeprefix("step")) < 6, "the stop saved a checkpoint mid-stage"
    assert f"stage ms.c1.s3-adamw: resuming from checkpoint {tag} (native" in interrupted["final"].stdout


@pytest.mark.slow
def test_after_both_interruptions_the_run_ends_with_the_uninterrupted_weights(interrupted: dict, uninterrupted: Path):
    out = interrupted["out"]
    assert [m["weights_digest"] for m in manifests(out)] == [m["weights_digest"] for m in manifests(uninterrupted)]
    assert [m["optimizer_state_digest"] for m in manifests(out)] == [m["optimizer_state_digest"] for m in manifests(uninterrupted)]
    for name in STAGES:
        steps = [r["stage_step"] for r in metric_rows(out / "phases" / name)]
        assert steps == list(range(1, len(steps) + 1)) and steps, f"{name}: every step logged once"
