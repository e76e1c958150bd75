"""Where each stage of a run stands, read from its folder alone (for `harness status`).
Never imports torch."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from harness.layout import RunDir, StageDir
from harness.manifest import valid_manifest


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
        index, name = stage_dir.root.name.split("-", 1)
        stage = json.loads(stage_dir.stage_json.read_text())["stage"] if stage_dir.stage_json.exists() else {}
        manifest = valid_manifest(stage_dir.manifest)
        checkpoint = stage_dir.latest_checkpoint()
        rows = _metric_rows(stage_dir)
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        done_steps = manifest["stage_steps"] if manifest else (rows[-1]["stage_step"] if rows else 0)
        if manifest:
            state = "done"
        elif checkpoint or rows:
            state = "interrupted"
        else:
            state = "pending"
        statuses.append(StageStatus(
            index=int(index),
            name=name,
            state=state,
            steps=f"{done_steps}/{stage.get('steps', '?')}",
            loss=losses[-1] if losses else None,
            checkpoint=checkpoint,
            load_mode=(manifest or {}).get("load", {}).get("mode") or _load_mode_in_progress(stage_dir),
        ))
    return statuses


def _metric_rows(stage_dir: StageDir) -> list[dict[str, Any]]:
    if not stage_dir.metrics.exists():
        return []
    rows = []
    for line in stage_dir.metrics.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return rows


def _load_mode_in_progress(stage_dir: StageDir) -> str | None:
    started = stage_dir.root / "started.json"
    return json.loads(started.read_text())["load"]["mode"] if started.exists() else None
