"""How an interrupted stage continues: decided on the launch side, before anything is launched.

A stage with checkpoints of its own resumes from its newest INTACT one: every checkpoint
marker lists its files with size and checksum, so a truncated, deleted or changed file is
found here, not as a crash inside the ranks. Newer damaged tags are moved to
checkpoints/damaged/ (never deleted). How the intact tag loads depends on what changed
since it was saved (a rerun with --force and an edited plan):

- native:       same engine settings (or ZeRO-0 fp32, whose state is whole on every rank):
                DeepSpeed loads the tag as it is.
- universal:    only the world size changed, within a ZeRO family, with Adam or AdamW (frozen
                parameters and adapters included): the tag is converted with DeepSpeed's
                ds_to_universal and loaded with load_universal; optimizer moments and scheduler carried.
- consolidated: anything else that changed (ZeRO family, optimizer type, precision,
                offload, trainable set): the tag's fp32 weights in a Hugging Face folder (an adapter
                stage's merged), a fresh optimizer, and the step, scheduler position and data position kept.
- refused:      the model changed, or the tag is past the stage's new end: PlanError (exit 2)
                with the way out.
What changed is `differences` of the tag's engine and the stage's (harness/records/engine.py), the
same comparison the load-mode rule reads. Never imports torch; the launch side makes the
converted folders before the launch (harness/launch/resume.py, in a child process).
"""
from __future__ import annotations

from typing import Any

from harness.plan import PlanError
from harness.records import CHECKPOINT_COMPLETE, CheckpointRecord, InvalidRecord, ResumePoint, StageDir, damaged_files, differences
from harness.records import Adapter, adapter_text
from harness.stages.stage import Stage, engine_identity

# ds_to_universal's ZeRO-3 loader knows Adam's state names only (DeepSpeed 0.19.8).
UNIVERSAL_OPTIMIZERS = {"Adam", "AdamW"}


def checkpoint_damage(stage_dir: StageDir, tag: str) -> tuple[CheckpointRecord | None, str | None]:
    """(the tag's record, None) when intact, else (record or None, what is wrong)."""
    folder = stage_dir.checkpoints / tag
    try:
        record = CheckpointRecord.read(folder / CHECKPOINT_COMPLETE)
    except InvalidRecord as error:
        return None, str(error)
    damaged = damaged_files(record.files, folder)
    return record, ("; ".join(damaged) if damaged else None)


def intact_checkpoint(stage_dir: StageDir) -> str | None:
    """The newest tag whose files are all there and unchanged."""
    return next((tag for tag in stage_dir.checkpoint_tags() if checkpoint_damage(stage_dir, tag)[1] is None), None)


def resume_point(stage: Stage, stage_dir: StageDir) -> ResumePoint:
    """How `stage` continues from its own checkpoints; raises PlanError when it cannot."""
    set_aside = []
    for tag in stage_dir.checkpoint_tags():
        record, damage = checkpoint_damage(stage_dir, tag)
        if damage is None:
            return _load_mode(stage, stage_dir, tag, record).model_copy(update={"set_aside": set_aside})
        set_aside.append(f"{tag} ({damage})")
    reason = "no checkpoint of its own" if not set_aside else "no intact checkpoint of its own"
    return ResumePoint(mode="fresh", reason=reason, set_aside=set_aside)


def _load_mode(stage: Stage, stage_dir: StageDir, tag: str, record: CheckpointRecord) -> ResumePoint:
    saved, now = record.engine, engine_identity(stage)
    step = record.progress.stage_step
    way_out = f"or move {stage_dir.checkpoints} aside to run the stage from its start"
    changed = differences(saved, now)
    if "model" in changed:
        raise PlanError([(f"stage '{stage.name}' model", now.model.model_dump(exclude_none=True),
                          f"the model its checkpoint {tag} was trained from ({saved.model.model_dump(exclude_none=True)}): "
                          f"restore model in the plan, {way_out}")])
    if step > stage.steps:
        raise PlanError([(f"stage '{stage.name}' steps", stage.steps,
                          f"at least {step}, where its checkpoint {tag} already is: raise steps, {way_out}")])
    common = {"tag": tag, "progress": record.progress}
    if not changed:
        return ResumePoint(mode="native", reason=f"same engine settings: DeepSpeed loads {tag} as saved", **common)
    if set(changed) == {"world size"} and saved.zero_stage == 0 and saved.dtype != "bf16":
        return ResumePoint(mode="native", reason=f"world size {_change(changed['world size'])}: ZeRO-0 state is whole on every rank", **common)
    summary = ", ".join(f"{what} {_change(values)}" for what, values in changed.items())
    if set(changed) == {"world size"} and saved.optimizer in UNIVERSAL_OPTIMIZERS:
        return ResumePoint(mode="universal", load_folder=str(stage_dir.checkpoints / f"universal-{tag}"),
                           reason=f"{summary}: {tag} resharded as a universal checkpoint, optimizer moments and scheduler carried", **common)
    return ResumePoint(mode="consolidated", load_folder=str(stage_dir.checkpoints / f"consolidated-{tag}"),
                       reason=f"{summary}: the fp32 weights of {tag} with a fresh optimizer; step, scheduler and data position kept", **common)


def _change(values: tuple[Any, Any]) -> str:
    if any(isinstance(v, Adapter) for v in values):
        return f"{adapter_text(values[0])} -> {adapter_text(values[1])}"
    return f"{values[0]} -> {values[1]}"


def ds_config_for(point: ResumePoint, config: dict[str, Any]) -> dict[str, Any]:
    """The stage's DeepSpeed config as the resume needs it: a universal load is a config switch."""
    if point.mode != "universal":
        return config
    return {**config, "checkpoint": {**config.get("checkpoint", {}), "load_universal": True}}
