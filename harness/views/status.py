"""Where each stage of a run stands, read from its folder alone (for `harness status`).
Never imports torch."""
from __future__ import annotations

from dataclasses import dataclass

from harness.records import InvalidRecord, RunDir, StageDir, StartRecord, read_json_lines, read_manifest
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
        ))
    return statuses


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
