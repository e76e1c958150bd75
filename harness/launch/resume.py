"""Before a launch, what a resume decided on the launch side (harness/stages/resume.py) needs on
disk: damaged tags moved aside (never deleted), and the converted folder a universal or
consolidated resume loads, made in a child process. Afterwards the conversions are dropped."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from harness.launch.jobs import convert_checkpoint
from harness.records import CHECKPOINT_COMPLETE, CheckpointRecord, ResumePoint, StageDir
from harness.stages import Stage


def prepare_resume(point: ResumePoint, stage: Stage, stage_dir: StageDir, echo: Callable[[str], None] = print) -> None:
    """Move damaged tags aside and make the folder a universal or consolidated resume loads."""
    for entry in point.set_aside:
        tag = entry.split(" ", 1)[0]
        target = stage_dir.checkpoints / "damaged" / f"{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        (stage_dir.checkpoints / tag).rename(target)
        echo(f"[harness] stage {stage.name}: checkpoint {entry} is damaged; moved to {target}")
    if point.mode in ("universal", "consolidated") and not (Path(point.load_folder) / CHECKPOINT_COMPLETE).exists():
        echo(f"[harness] stage {stage.name}: {point.reason}")
        saved = CheckpointRecord.read(stage_dir.checkpoints / point.tag / CHECKPOINT_COMPLETE).engine
        convert_checkpoint({"checkpoint": str(stage_dir.checkpoints / point.tag), "mode": point.mode, "out": point.load_folder,
                            "model": stage.model.model_dump(mode="json"),
                            "adapter": saved.adapter.model_dump(mode="json") if saved.adapter else None})


def drop_conversions(stage_dir: StageDir) -> None:
    """Converted copies of checkpoints (universal-*, consolidated-*) once the stage is done:
    they are made again from the tag whenever needed."""
    for folder in list(stage_dir.checkpoints.glob("universal-step*")) + list(stage_dir.checkpoints.glob("consolidated-step*")):
        shutil.rmtree(folder)
