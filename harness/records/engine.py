"""The identity of a stage's engine: what decides whether a DeepSpeed checkpoint (optimizer
moments included) loads into another engine. Built once from a Stage on the launch side
(harness/stages/stage.py engine_identity), embedded in every checkpoint marker, the manifest and
the start decision; `differences` is what both the resume rule (harness/stages/resume.py) and
the load-mode rule (harness/stages/start.py) read, so the two cannot disagree on what changed.
"""
from __future__ import annotations

from typing import Any, Literal

from harness.plan import ModelSpec, OffloadSpec
from harness.records.files import Record


class Adapter(Record):
    """A stage's adapter as resolved against the model (harness/stages/adapter.py): what the worker
    applies with peft, what its merge computes, and part of the engine identity (a stage carries
    the previous stage's adapters and moments only when this is equal)."""

    type: Literal["lora"]
    r: int
    alpha: float
    dropout: float
    targets: list[str]
    """Module names (as in the base model's named_modules) that get LoRA matrices."""
    modules_to_save: list[str]
    """Module names trained fully next to the adapters (peft's trainable copies)."""

    @property
    def scale(self) -> float:
        """LoRA's scaling of B A: alpha / r."""
        return self.alpha / self.r

    def describe(self) -> str:
        """'lora r=16 alpha=32 dropout=0.05 on 14 layers, + lm_head' for the console."""
        saved = f", + {', '.join(self.modules_to_save)}" if self.modules_to_save else ""
        return f"{self.type} r={self.r} alpha={self.alpha:g} dropout={self.dropout:g} on {len(self.targets)} layers{saved}"


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
    adapter: Adapter | None = None
    """The adapter the engine trains on a frozen base; None: the model's own parameters train."""


def zero_family(zero_stage: int) -> str:
    """Stages whose native checkpoints load into each other (DeepSpeed 0.19.8: not across ZeRO-1/2 <-> 3)."""
    return {0: "zero-0", 1: "zero-1/2", 2: "zero-1/2", 3: "zero-3"}[zero_stage]


def differences(before: EngineIdentity, now: EngineIdentity) -> dict[str, tuple[Any, Any]]:
    """What changed from `before` to `now`, as {what: (before, now)} in this order: model, optimizer,
    ZeRO stage (only across ZeRO families: ZeRO-1 and ZeRO-2 checkpoints are the same), world size,
    precision, offload, trainable set (which parameters train), trainable groups (the same
    parameters in other lr groups), adapter (put first when it changed, in place of the trainable
    set it leads to: any change of it, even one that keeps the parameter names such as alpha, makes
    the next stage start from merged weights). Empty: a checkpoint of one loads natively into the other."""
    pairs = {
        "model": (before.model, now.model),
        "optimizer": (before.optimizer, now.optimizer),
        "ZeRO stage": (before.zero_stage, now.zero_stage),
        "world size": (before.world_size, now.world_size),
        "precision": (before.dtype, now.dtype),
        "offload": (before.offload.model_dump(), now.offload.model_dump()),
        "trainable set": (before.trained, now.trained),
        "trainable groups": (before.layout, now.layout),
        "adapter": (before.adapter, now.adapter),
    }
    changed = {what: values for what, values in pairs.items() if values[0] != values[1]}
    if "ZeRO stage" in changed and zero_family(before.zero_stage) == zero_family(now.zero_stage):
        del changed["ZeRO stage"]
    if "trainable set" in changed:
        changed.pop("trainable groups", None)  # other parameters are other groups too
    if "adapter" in changed:  # it says more than the digests of the parameter names it leads to
        changed = {"adapter": changed.pop("adapter"), **changed}
        changed.pop("trainable set", None)
        changed.pop("trainable groups", None)
    return changed


def adapter_text(adapter: Adapter | None) -> str:
    """An adapter for a reason line: 'none', or what Adapter.describe says."""
    return "none" if adapter is None else adapter.describe()


def trained_count(identity: EngineIdentity) -> str:
    """'all', or the number of trained elements: '1,000'."""
    return "all" if identity.trainable_params is None else f"{identity.trainable_params:,}"
