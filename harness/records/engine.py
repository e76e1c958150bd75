"""The identity of a stage's engine: what decides whether a DeepSpeed checkpoint (optimizer
moments included) loads into another engine. Built once from a Stage on the launch side
(harness/stages/stage.py engine_identity), embedded in every checkpoint marker, the manifest and
the start decision; `differences` is what both the resume rule (harness/stages/resume.py) and
the load-mode rule (harness/stages/start.py) read, so the two cannot disagree on what changed.
"""
from __future__ import annotations

from typing import Any

from harness.plan import ModelSpec, OffloadSpec
from harness.records.files import Record


class EngineIdentity(Record):
    """What a stage's engine is, as far as its checkpoints are concerned."""

    optimizer: str
    zero_stage: int
    world_size: int
    dtype: str
    offload: OffloadSpec
    model: ModelSpec
    trained: str = "all"
    """Which parameters train (TrainableSet.trained): 'all', or a digest of their names."""
    layout: str = "all"
    """Which parameters train in which lr groups (TrainableSet.layout): 'all' (every parameter, one
    group), or a digest. Optimizer state exists only for trained parameters, one flat partition per group."""
    trainable_params: int | None = None
    """Trained elements; None: every parameter."""


def zero_family(zero_stage: int) -> str:
    """Stages whose native checkpoints load into each other (DeepSpeed 0.19.8: not across ZeRO-1/2 <-> 3)."""
    return {0: "zero-0", 1: "zero-1/2", 2: "zero-1/2", 3: "zero-3"}[zero_stage]


def differences(before: EngineIdentity, now: EngineIdentity) -> dict[str, tuple[Any, Any]]:
    """What changed from `before` to `now`, as {what: (before, now)} in this order: model, optimizer,
    ZeRO stage (only across ZeRO families: ZeRO-1 and ZeRO-2 checkpoints are the same), world size,
    precision, offload, trainable set (which parameters train), trainable groups (the same
    parameters in other lr groups). Empty: a checkpoint of one loads natively into the other."""
    pairs = {
        "model": (before.model, now.model),
        "optimizer": (before.optimizer, now.optimizer),
        "ZeRO stage": (before.zero_stage, now.zero_stage),
        "world size": (before.world_size, now.world_size),
        "precision": (before.dtype, now.dtype),
        "offload": (before.offload.model_dump(), now.offload.model_dump()),
        "trainable set": (before.trained, now.trained),
        "trainable groups": (before.layout, now.layout),
    }
    changed = {what: values for what, values in pairs.items() if values[0] != values[1]}
    if "ZeRO stage" in changed and zero_family(before.zero_stage) == zero_family(now.zero_stage):
        del changed["ZeRO stage"]
    if "trainable set" in changed:
        changed.pop("trainable groups", None)  # other parameters are other groups too
    return changed


def trained_count(identity: EngineIdentity) -> str:
    """'all', or the number of trained elements: '1,000'."""
    return "all" if identity.trainable_params is None else f"{identity.trainable_params:,}"
