"""A failed stage says what happened and what to do: a rank SIGKILLed (most often by the kernel's
out-of-memory killer) is named with its last recorded peak memory, and the advice is what to
change, not to run the same thing again; failures a rerun gets past keep the rerun advice."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, make_plan, pretrain_phase, write_plan
from harness.launch.failures import explain_exit, signal_of
from harness.records import StageDir
from harness.records import CheckpointRecord, MemoryRecord, Progress, RankRecord, folder_checks
from harness.stages import engine_identity
from harness.launch.setup import validated_stages


def wait_for(predicate, run: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.poll() is None:
        if predicate():
            return
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)  # the harness stops every rank it started
    raise AssertionError(f"no {what}; the run: {run.communicate(timeout=120)}")


def recorded(path: Path, milestone: str) -> bool:
    try:
        return json.loads(path.read_text())["milestone"] == milestone
    except (OSError, ValueError):
        return False


def test_a_sigkilled_rank_is_named_with_its_peak_memory_and_no_rerun_advice(tmp_path: Path):
    plan = make_plan("oom", [pretrain_phase("long", steps=100000)], port=29720)
    plan_path, out = write_plan(tmp_path, plan), tmp_path / "run"
    stage = StageDir(out / "phases" / "00-long")
    run = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", plan_path, "--out", out], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: all(recorded(stage.rank_memory(r), "initialized") for r in (0, 1)), run, 240, "memory record from both ranks")
    os.kill(json.loads((stage.ranks / "rank1.json").read_text())["pid"], signal.SIGKILL)  # as the OOM killer does
    _, stderr = run.communicate(timeout=120)

    assert run.returncode == 1
    assert "stage 00 'long' (phase 'long') failed: rank 1 was killed by SIGKILL, most often the kernel's out-of-memory killer" in stderr
    assert "rank 1: killed; peak RSS" in stderr and str(stage.rank_log(1)) in stderr
    assert "micro_batch: 4 -> 2" in stderr and "zero_stage: 2 -> 3" in stderr and "procs_per_node: 2 -> fewer" in stderr
    assert "rerun" not in stderr


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    _, stages, _ = validated_stages(write_plan(folder, make_plan("msgs", [pretrain_phase("pre", zero_stage=2)], port=29730)))
    return stages[0]


def fake_ranks(stage_dir: StageDir, ends: dict[int, str], peak_gb: float = 9.8) -> None:
    """What two ranks leave behind: rank file, memory record, end record ('' = SIGKILLed)."""
    stage_dir.ranks.mkdir(parents=True)
    for rank, end in ends.items():
        RankRecord(rank=rank, node_rank=0, host="node1", address=None, slurm_node=None, pid=1, launcher_pid=1, time=0.0).write(stage_dir.rank_record(rank))
        MemoryRecord(rank=rank, host="node1", pid=1, milestone="checkpoint", time=0.0, peak_rss_bytes=int(peak_gb * 1e9),
                     rss_bytes=int(peak_gb * 1e9), host_memory_bytes=int(24e9), milestones={}).write(stage_dir.rank_memory(rank))
        stage_dir.rank_end(rank).write_text(end)


def test_sigkill_message_lists_every_rank_and_what_to_change(stage, tmp_path: Path):
    stage_dir = StageDir(tmp_path / "00-pre")
    fake_ranks(stage_dir, {0: "Current thread 0x1 (most recent call first):\n  File ...\n", 1: ""})

    detail, advice = explain_exit(stage, stage_dir, 247)

    assert detail == "rank 1 was killed by SIGKILL, most often the kernel's out-of-memory killer"
    assert "rank 0: stopped by the launcher; peak RSS 9.80 GB of 24.00 GB on node1 (last recorded at 'checkpoint')" in advice
    assert f"rank 1: killed; peak RSS 9.80 GB of 24.00 GB on node1 (last recorded at 'checkpoint'); log: {stage_dir.rank_log(1)}" in advice
    assert "zero_stage: 2 -> 3" in advice and "rerun" not in advice


def test_a_rank_that_raised_is_named_and_the_advice_is_to_rerun(stage, tmp_path: Path):
    stage_dir = StageDir(tmp_path / "00-pre")
    fake_ranks(stage_dir, {0: "Current thread 0x1 (most recent call first):\n", 1: "exit\n"})

    detail, advice = explain_exit(stage, stage_dir, 1)

    assert detail == f"the launcher reported a failure; rank 1 failed first, see {stage_dir.rank_log(1)}"
    assert advice == "  rerun the same command to run it again from its start (it has no intact checkpoint)."


def test_preemption_keeps_the_resume_advice(stage, tmp_path: Path):
    stage_dir = StageDir(tmp_path / "00-pre")
    tag = stage_dir.checkpoints / "step10"
    tag.mkdir(parents=True)
    (tag / "model_states.pt").write_bytes(b"weights")
    CheckpointRecord(progress=Progress(stage_step=10), engine=engine_identity(stage), files=folder_checks(tag, tag)).write(tag / "complete")

    assert explain_exit(stage, stage_dir, 75) == (
        "stopped on request (preemption) after saving a checkpoint",
        "  rerun the same command to resume it from its newest intact checkpoint (step10).",
    )
    (tag / "model_states.pt").write_bytes(b"weightz")  # damaged: a rerun starts the stage again
    assert explain_exit(stage, stage_dir, 75)[1] == "  rerun the same command to run it again from its start (it has no intact checkpoint)."


@pytest.mark.parametrize("exit_code, signum", [(247, 9), (-9, 9), (137, 9), (250, 6), (1, None), (75, None), (0, None)])
def test_the_signal_behind_a_launcher_exit_code(exit_code, signum):
    assert signal_of(exit_code) == signum
