"""Where each stage of a run stands, read from its folder alone (for `harness status`).
Never imports torch."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from harness.records.console import duration
from harness.records import Heartbeat, InvalidRecord, RunDir, StageDir, StartRecord, read_json_lines, read_manifest
from harness.stages import StageFile


@dataclass
class StageStatus:
    """Where one stage stands, read from its folder."""

    index: int
    name: str
    state: str
    steps: str
    loss: float | None
    checkpoint: str | None
    load_mode: str | None
    eta: str | None = None
    """While it runs: '1m05s (plan 4m10s)', from its last metrics row (harness/worker/pace.py)."""


def stage_statuses(run: RunDir) -> list[StageStatus]:
    """One status per stage folder, for `harness status`."""
    statuses = []
    for stage_dir in run.stage_dirs():
        steps = _planned_steps(stage_dir)
        try:
            manifest = read_manifest(stage_dir)
        except InvalidRecord:
            manifest = None
        checkpoint = stage_dir.latest_checkpoint()
        rows = read_json_lines(stage_dir.metrics)
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        done_steps = manifest.stage_steps if manifest else (rows[-1]["stage_step"] if rows else 0)
        if manifest:
            state = "done"
        elif stage_dir.manifest.exists():
            state = "damaged handoff"  # a rerun resumes from the final checkpoint and writes it again
        elif _running(stage_dir):
            state = "running"
        elif checkpoint or rows:
            state = "interrupted"
        else:
            state = "pending"
        statuses.append(StageStatus(
            index=stage_dir.index,
            name=stage_dir.name,
            state=state,
            steps=f"{done_steps}/{steps}",
            loss=losses[-1] if losses else None,
            checkpoint=checkpoint,
            load_mode=manifest.load.mode if manifest else _load_mode_in_progress(stage_dir),
            eta=_eta(stage_dir, rows) if state == "running" else None,
        ))
    return statuses


RUNNING_S = 30.0
"""Rank 0's heartbeat rewritten this recently (it is rewritten every second): the stage runs, if its
process still does where that can be seen (on this machine)."""


def _running(stage_dir: StageDir) -> bool:
    path = stage_dir.rank_heartbeat(0)
    try:
        beat = Heartbeat.read(path)
        if time.time() - path.stat().st_mtime >= RUNNING_S:
            return False
    except (InvalidRecord, OSError):
        return False
    if beat.host != socket.gethostname():
        return True
    try:
        os.kill(beat.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that number: alive
        pass
    return True


def _eta(stage_dir: StageDir, rows: list[dict]) -> str | None:
    """The last row's ETAs less the time since it was written."""
    last = next((row for row in reversed(rows) if "train/eta_stage_s" in row), None)
    if last is None:
        return None
    since = time.time() - stage_dir.metrics.stat().st_mtime
    return f"{duration(max(0.0, last['train/eta_stage_s'] - since))} (plan {duration(max(0.0, last['train/eta_plan_s'] - since))})"


def _planned_steps(stage_dir: StageDir) -> int | str:
    try:
        return StageFile.read(stage_dir.stage_json).stage.steps
    except InvalidRecord:
        return "?"


def _load_mode_in_progress(stage_dir: StageDir) -> str | None:
    try:
        return StartRecord.read(stage_dir.started).load.mode
    except InvalidRecord:
        return None
