"""A plan's phases and the plan itself: a phase is its training settings plus kind and data; a
multistep phase repeats its stages (each merged over the phase) for some cycles."""
from __future__ import annotations

import copy
from typing import Any, Literal

from typing import Annotated

from pydantic import BeforeValidator, Field, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from harness.plan.cluster import ClusterSpec, SlurmSpec, WandbSpec
from harness.plan.data import DataSpec, MultistepData
from harness.plan.fields import NAME_PATTERN, Strict
from harness.plan.model import ModelSpec
from harness.plan.training import TrainSettings

OBJECTIVE_KINDS = ("pretrain", "finetune", "preference")
"""Phase kinds that train one objective (each has its two halves in harness/objectives and
harness/worker/objectives); a multistep phase alternates the pretrain and finetune objectives."""
STAGE_SOURCES = ("pretrain", "finetune", "mix")


def _stage_source(value: Any) -> Any:
    if value is None or value in STAGE_SOURCES:
        return value
    raise ValueError("pretrain, finetune or mix: a multistep stage draws its batches from its phase's pretrain and finetune "
                     "data sets (preference pairs train in a phase of their own, kind: preference)")


class StageSettings(TrainSettings):
    """One stage of a multistep phase: its own optimizer, schedule and length."""

    name: str | None = Field(None, pattern=NAME_PATTERN)
    """Suffix of the stage name; default: the optimizer type, lower case."""
    data: Annotated[Literal[STAGE_SOURCES], BeforeValidator(_stage_source)] = "mix"  # type: ignore[valid-type]
    """Which of the phase's data sets the stage's steps draw from: pretrain, finetune, or mix (the phase's `mix`)."""


def _overrides(model: type[Strict]) -> type[Strict]:
    """The override form of a model: the same fields, each optional (None when not given) with its
    constraints kept, nested blocks in override form too; without the model's validators, since an
    override is checked field by field here and as a whole once merged over what it overrides."""
    fields = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Strict):
            annotation = _overrides(annotation)
        fields[name] = (annotation | None, FieldInfo.merge_field_infos(field, default=None))
    return create_model(f"{model.__name__}Override", __base__=Strict, __doc__=f"{model.__name__} fields to override.", **fields)


StageOverride = _overrides(StageSettings)
"""A multistep stage as the plan gives it: the StageSettings fields it changes."""


class PhaseSpec(TrainSettings):
    """One phase: a pretrain, finetune or multistep block of training."""

    name: str = Field(pattern=NAME_PATTERN)
    """The phase's name, unique in the plan: its stages and their folders are named after it
    (phases/<NN>-<name>/; a multistep phase's stages <name>.c1.s2-sgd-momentum and so on)."""
    kind: Literal[OBJECTIVE_KINDS + ("multistep",)]  # type: ignore[valid-type]
    """pretrain: text packed into blocks of seq_len, loss on every token; finetune: prompt/response,
    alpaca or chat rows (data.rows), loss on the responses only; multistep: cycles of stages, each
    with its own optimizer, over a pretrain and a finetune set."""
    data: DataSpec | MultistepData
    """What it trains on: one data set, or for a multistep phase {pretrain: ..., finetune: ..., mix: ...}."""
    cycles: int = Field(1, ge=1)
    """multistep: how many times the stage list repeats."""
    stages: list[StageOverride] = []
    """multistep: stage overrides, each merged over this phase's settings (then validated as StageSettings)."""

    def settings(self) -> TrainSettings:
        """The phase's training settings (the plan's defaults are already merged in)."""
        return TrainSettings.model_validate(self.model_dump(include=set(TrainSettings.model_fields)))

    def stage_settings(self, j: int) -> StageSettings:
        """Multistep stage j: its overrides merged over the phase's settings. Raises ValidationError."""
        return StageSettings.model_validate(self.stage_input(j))

    def stage_input(self, j: int) -> dict[str, Any]:
        """Multistep stage j as plain data: the fields it gives merged over the phase's settings."""
        return deep_merge(self.settings().model_dump(), self.stages[j].model_dump(exclude_unset=True))

    @model_validator(mode="after")
    def _kind_fits(self) -> PhaseSpec:
        if self.kind == "multistep":
            if not isinstance(self.data, MultistepData):
                raise ValueError("a multistep phase needs data: {pretrain: ..., finetune: ..., mix: ...}")
            if not self.stages:
                raise ValueError("a multistep phase needs a non-empty stages list")
        else:
            if not isinstance(self.data, DataSpec):
                raise ValueError(f"a {self.kind} phase takes one data set (files or hub), not pretrain/finetune")
            if self.stages or self.cycles != 1:
                raise ValueError("stages and cycles belong to multistep phases")
        return self



class Plan(Strict):
    """A whole training run. Besides these fields a plan may hold `defaults:`, any training settings
    (TrainSettings); every phase starts from them, its own values merged over them."""

    name: str = Field(pattern=NAME_PATTERN)
    """The run's name: in W&B group names and the SLURM job names."""
    model: ModelSpec
    """The model the first phase starts from (each later phase starts from the one before)."""
    cluster: ClusterSpec = ClusterSpec()
    """Where the phases run and how the launcher reaches the nodes."""
    wandb: WandbSpec = WandbSpec()
    """Weights & Biases logging of every stage."""
    slurm: SlurmSpec = SlurmSpec()
    """sbatch options for `harness submit`."""
    cache_dir: str | None = None
    """Where token stores are kept, shared by every run that names the same folder (default
    $XDG_CACHE_HOME/harness, i.e. ~/.cache/harness). Put it on a shared file system for multi-node runs."""
    phases: list[PhaseSpec] = Field(min_length=1)
    """The phases, run in this order, each handing its model to the next."""

    @field_validator("phases")
    @classmethod
    def _unique_names(cls, phases: list[PhaseSpec]) -> list[PhaseSpec]:
        names = [p.name for p in phases]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"phase names must be unique; repeated: {duplicated}")
        return phases



def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, recursively. A block whose `type` differs replaces
    the base block instead of merging into it (Adam betas must not leak into SGD)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and old.get("type", value.get("type")) == value.get("type", old.get("type")):
            merged[key] = deep_merge(old, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
