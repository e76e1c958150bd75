"""The plan file: one YAML that describes a whole training run as ordered phases.

Typed with pydantic v2. `load_plan` reads the YAML, merges each phase over the
plan's `defaults`, validates everything, and raises one `PlanError` that lists
every problem with the field path, the value and what is allowed.
No torch here: the orchestrator imports this.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# DeepSpeed accepts these case-insensitively (its own optimizers) or as exact
# torch.optim names; we normalise the user's spelling to the one DeepSpeed needs
# (DeepSpeed 0.19.8 falls back to getattr(torch.optim, name), so "sgd" fails).
OPTIMIZER_NAMES = {
    "adam": "Adam",
    "adamw": "AdamW",
    "adagrad": "Adagrad",
    "lamb": "Lamb",
    "lion": "Lion",
    "sgd": "SGD",
    "rmsprop": "RMSprop",
}
# Parameters each optimizer takes, besides lr and weight_decay.
OPTIMIZER_PARAMS = {
    "Adam": {"betas", "eps"},
    "AdamW": {"betas", "eps"},
    "Adagrad": {"eps"},
    "Lamb": {"betas", "eps"},
    "Lion": {"betas"},
    "SGD": {"momentum", "nesterov", "dampening"},
    "RMSprop": {"momentum", "eps", "alpha"},
}
# DeepSpeed 0.19.8: Lamb and Lion (without offload) fail on CPU.
CPU_UNSUPPORTED_OPTIMIZERS = {"Lamb", "Lion"}
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"


class Strict(BaseModel):
    """Base for every plan block: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    """Which model to train: a built-in tiny config or a local Hugging Face folder."""

    builtin: Literal["tiny-llama", "small-llama"] | None = None
    """A named Llama-shaped config built with transformers (random init)."""
    path: str | None = None
    """A local Hugging Face model folder (config.json + weights)."""
    tokenizer: str = "bytes"
    """'bytes' (built-in byte-level tokenizer, offline) or a local tokenizer folder."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.builtin is None) == (self.path is None):
            raise ValueError("give exactly one of model.builtin or model.path")
        return self


class ClusterSpec(Strict):
    """Where the phases run and how the `deepspeed` launcher reaches the nodes."""

    launcher: Literal["local", "pdsh", "slurm"] = "local"
    """local: one node; pdsh: hostfile over ssh; slurm: inside a SLURM allocation."""
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when `nvidia-smi -L` lists a GPU, else cpu (DS_ACCELERATOR=cpu, gloo)."""
    nodes: int = Field(1, ge=1)
    procs_per_node: int = Field(1, ge=1)
    """GPUs per node (or CPU processes per node)."""
    hostfile: str | None = None
    """DeepSpeed hostfile ('host slots=N' lines); pdsh only."""
    hosts: list[str] | None = None
    """Host list instead of a hostfile; pdsh only."""
    include: str | None = None
    exclude: str | None = None
    master_addr: str = "127.0.0.1"
    master_port: int | None = Field(None, ge=1024, le=65535)
    """First port to try; each phase takes the next free one (a reused port stalls init ~30 s)."""
    launcher_args: list[str] = []
    """Extra arguments for the `deepspeed` launcher, passed as given."""
    env: dict[str, str] = {}
    """Environment for every rank (written to .deepspeed_env for remote nodes)."""


class OptimizerSpec(Strict):
    """One optimizer; only the parameters that its type takes are allowed."""

    type: str = "AdamW"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] | None = None
    eps: float | None = Field(None, gt=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    nesterov: bool | None = None
    dampening: float | None = Field(None, ge=0)
    alpha: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _normalise_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("type"), str):
            known = OPTIMIZER_NAMES.get(data["type"].lower())
            if known is None:
                raise ValueError(
                    f"unknown optimizer type {data['type']!r}; allowed: {', '.join(OPTIMIZER_NAMES.values())}"
                )
            data = {**data, "type": known}
        return data

    @model_validator(mode="after")
    def _params_fit_type(self) -> OptimizerSpec:
        given = {k for k in ("betas", "eps", "momentum", "nesterov", "dampening", "alpha") if getattr(self, k) is not None}
        extra = given - OPTIMIZER_PARAMS[self.type]
        if extra:
            raise ValueError(
                f"{self.type} does not take {sorted(extra)}; it takes lr, weight_decay, {sorted(OPTIMIZER_PARAMS[self.type])}"
            )
        if self.nesterov and not self.momentum:
            raise ValueError("nesterov needs momentum > 0")
        return self

    def params(self) -> dict[str, Any]:
        """The optimizer's parameters as DeepSpeed's config takes them."""
        return self.model_dump(exclude={"type"}, exclude_none=True)


class SchedulerSpec(Strict):
    """Learning-rate schedule; its length is computed from the phase's steps."""

    type: Literal["none", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle"] = "WarmupLR"
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    """Fraction of the stage's steps spent warming up."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Cosine/decay floor as a fraction of the peak lr."""
    span: Literal["stage", "phase"] = "stage"
    """multistep: one schedule per stage, or one schedule across the whole phase (each stage
    continues it where the previous stage stopped)."""


class OffloadSpec(Strict):
    """ZeRO CPU offload."""

    optimizer: bool = False
    """Optimizer states on CPU (ZeRO >= 1)."""
    params: bool = False
    """Parameters on CPU (ZeRO-3 only)."""


class RegularizationSpec(Strict):
    """L1/L2 penalties added to the loss (or L2 as the optimizer's weight decay)."""

    l1: float = Field(0.0, ge=0)
    """Adds l1 * sum(|w|) to the loss."""
    l2: float = Field(0.0, ge=0)
    """Adds l2 * sum(w^2) to the loss (mode 'penalty'), or is the optimizer's weight_decay (mode 'weight_decay')."""
    l2_mode: Literal["penalty", "weight_decay"] = "penalty"
    include_1d: bool = False
    """Also regularize biases and norm weights (1-D parameters); off by default."""

    @property
    def active(self) -> bool:
        return self.l1 > 0 or (self.l2 > 0 and self.l2_mode == "penalty")


class DataSpec(Strict):
    """One data set: local files (text, jsonl, parquet) or a hub name when online."""

    files: list[str] = []
    hub: str | None = None
    """A Hugging Face hub dataset name (needs a network)."""
    format: Literal["auto", "text", "json", "parquet"] = "auto"
    text_field: str = "text"
    """pretrain: the column with the text (json/parquet)."""
    prompt_field: str = "prompt"
    """finetune: the column with the prompt."""
    response_field: str = "response"
    """finetune: the column with the response (the only tokens with loss)."""
    eval_fraction: float = Field(0.05, gt=0, lt=1)
    """Held-out share for evaluation (taken deterministically from the end after shuffling with the seed)."""
    eval_max_samples: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if bool(self.files) == bool(self.hub):
            raise ValueError("give exactly one of files or hub")
        return self

    def resolved_format(self) -> str:
        if self.format != "auto" or not self.files:
            return self.format
        suffix = Path(self.files[0]).suffix.lower()
        return {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix, "text")


class MixSpec(Strict):
    """How a multistep stage draws its batches when it trains on both data sets."""

    pretrain: float = Field(0.5, ge=0, le=1)
    finetune: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> MixSpec:
        if abs(self.pretrain + self.finetune - 1.0) > 1e-6:
            raise ValueError(f"mix ratios must sum to 1, got {self.pretrain} + {self.finetune}")
        return self


class MultistepData(Strict):
    """Data of a multistep phase: both sets, and how stages mix them."""

    pretrain: DataSpec
    finetune: DataSpec
    mix: Literal["alternate"] | MixSpec = "alternate"
    """'alternate': steps alternate pretrain/finetune; or ratios, e.g. {pretrain: 0.7, finetune: 0.3}."""


class TrainSettings(Strict):
    """Settings a phase (and a multistep stage) may set; unset ones come from defaults."""

    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    """finetune only: passes over the training rows."""
    tokens: int | None = Field(None, ge=1)
    """Token budget: steps = ceil(tokens / (global_batch * seq_len))."""
    seq_len: int = Field(128, ge=8)
    micro_batch: int = Field(4, ge=1)
    global_batch: int | None = Field(None, ge=1)
    """Samples per optimizer step; must equal micro_batch x grad_accum x world size. Default: micro_batch x world."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: OffloadSpec = OffloadSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    regularization: RegularizationSpec = RegularizationSpec()
    grad_clip: float = Field(1.0, ge=0)
    """Gradient norm clipping; 0 turns it off (DeepSpeed 0.19.8 defaults to 1.0 if unset)."""
    checkpoint_every: int = Field(50, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(4, ge=1)
    log_every: int = Field(1, ge=1)
    seed: int = 1234
    nodes: int | None = Field(None, ge=1)
    """Override cluster.nodes for this phase (world size may change between phases)."""
    procs_per_node: int | None = Field(None, ge=1)
    """Override cluster.procs_per_node for this phase."""
    deepspeed: dict[str, Any] = {}
    """Raw DeepSpeed config, deep-merged last over the generated one."""

    @model_validator(mode="after")
    def _offload_fits_zero(self) -> TrainSettings:
        if self.offload.optimizer and self.zero_stage == 0:
            raise ValueError("offload.optimizer needs zero_stage >= 1")
        if self.offload.params and self.zero_stage != 3:
            raise ValueError("offload.params needs zero_stage 3")
        return self


class StageSettings(TrainSettings):
    """One stage of a multistep phase: its own optimizer, schedule and length."""

    name: str | None = Field(None, pattern=NAME_PATTERN)
    """Suffix of the stage name; default: the optimizer type, lower case."""
    data: Literal["pretrain", "finetune", "mix"] = "mix"


class PhaseSpec(TrainSettings):
    """One phase: a pretrain, finetune or multistep block of training."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["pretrain", "finetune", "multistep"]
    data: DataSpec | MultistepData
    cycles: int = Field(1, ge=1)
    """multistep: how many times the stage list repeats."""
    stages: list[dict[str, Any]] = []
    """multistep: stage overrides, each merged over this phase's settings (validated as StageSettings)."""

    def settings(self) -> TrainSettings:
        """The phase's training settings (the plan's defaults are already merged in)."""
        return TrainSettings.model_validate(self.model_dump(include=set(TrainSettings.model_fields)))

    def stage_settings(self, j: int) -> StageSettings:
        """Multistep stage j: its overrides merged over the phase's settings. Raises ValidationError."""
        return StageSettings.model_validate(deep_merge(self.settings().model_dump(), self.stages[j]))

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


class WandbSpec(Strict):
    """Weights & Biases logging: one W&B run per stage, all in one group."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: WANDB_MODE if set, else online when an API key is configured (WANDB_API_KEY or
    `wandb login`), else offline."""
    project: str = "harness"
    entity: str | None = None
    group: str | None = None
    """Default: '<run name>-<run id>'."""
    tags: list[str] = []
    log_every: int = Field(1, ge=1)
    log_model: bool = False
    """Log each stage's final Hugging Face model folder as an artifact reference."""


class SlurmSpec(Strict):
    """sbatch options for `harness submit`: one job per stage, chained with afterok."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "01:00:00"
    """Time limit per job (sbatch --time)."""
    gpus_per_node: int | None = Field(None, ge=0)
    """Default: procs_per_node on GPU clusters, none on CPU."""
    cpus_per_task: int | None = Field(None, ge=1)
    preempt_grace_s: int = Field(120, ge=10)
    """SLURM sends USR1 this long before the time limit: the ranks checkpoint and the job requeues."""
    max_requeues: int = Field(20, ge=0)
    extra: list[str] = []
    """Further sbatch options, one per item, e.g. "--constraint=h100"."""


class Plan(Strict):
    """A whole training run."""

    name: str = Field(pattern=NAME_PATTERN)
    model: ModelSpec
    cluster: ClusterSpec = ClusterSpec()
    wandb: WandbSpec = WandbSpec()
    slurm: SlurmSpec = SlurmSpec()
    phases: list[PhaseSpec] = Field(min_length=1)

    @field_validator("phases")
    @classmethod
    def _unique_names(cls, phases: list[PhaseSpec]) -> list[PhaseSpec]:
        names = [p.name for p in phases]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"phase names must be unique; repeated: {duplicated}")
        return phases


class PlanError(Exception):
    """Every problem found in a plan, each as (field path, value, what is allowed)."""

    def __init__(self, problems: list[tuple[str, Any, str]]):
        self.problems = problems
        super().__init__(self.message())

    def message(self) -> str:
        lines = [f"{len(self.problems)} problem(s) in the plan:"]
        for path, value, allowed in self.problems:
            lines.append(f"  {path or '<plan>'}: {_short(value)} -> {allowed}")
        return "\n".join(lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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


def _problems_from(error: ValidationError, prefix: str, raw: Any) -> list[tuple[str, Any, str]]:
    problems = []
    for item in error.errors():
        loc = [str(p) for p in item["loc"] if not str(p).startswith(("function-after", "function-before"))]
        # Unions name their branch in the location (e.g. "DataSpec"); drop those.
        loc = [p for p in loc if not p[:1].isupper()]
        path = prefix
        for part in loc:
            path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
        value = item.get("input", raw)
        msg = item["msg"].removeprefix("Value error, ")
        problems.append((path, value, msg))
    return problems


def parse_plan(raw: Any, base_dir: Path) -> Plan:
    """Validate a plan given as plain data; relative file paths resolve against base_dir."""
    if not isinstance(raw, dict):
        raise PlanError([("", raw, "a plan is a mapping with name, model, phases")])
    raw = dict(raw)
    defaults = raw.pop("defaults", {}) or {}
    problems: list[tuple[str, Any, str]] = []
    if not isinstance(defaults, dict):
        raise PlanError([("defaults", defaults, "a mapping of phase settings")])
    phases = raw.get("phases")
    if isinstance(phases, list):
        raw["phases"] = [deep_merge(defaults, p) if isinstance(p, dict) else p for p in phases]
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as error:
        raise PlanError(_problems_from(error, "", raw)) from None
    problems += _check_stages(plan)
    problems += _check_paths(plan, base_dir)
    if problems:
        raise PlanError(problems)
    return _resolve_paths(plan, base_dir)


def _check_stages(plan: Plan) -> list[tuple[str, Any, str]]:
    """Multistep stage overrides are validated against the phase they merge into."""
    problems = []
    for i, phase in enumerate(plan.phases):
        for j, override in enumerate(phase.stages):
            try:
                phase.stage_settings(j)
            except ValidationError as error:
                problems += _problems_from(error, f"phases[{i}].stages[{j}]", override)
        if phase.kind == "pretrain" and phase.epochs is not None:
            problems.append((f"phases[{i}].epochs", phase.epochs, "pretrain phases take steps or tokens (packed blocks are counted only after tokenizing)"))
        if phase.kind != "multistep":
            given = [k for k in ("steps", "epochs", "tokens") if getattr(phase, k) is not None]
            if len(given) != 1:
                problems.append((f"phases[{i}]", given, "give exactly one of steps, epochs, tokens"))
    return problems


def _data_specs(phase: PhaseSpec) -> list[tuple[str, DataSpec]]:
    if isinstance(phase.data, MultistepData):
        return [("data.pretrain", phase.data.pretrain), ("data.finetune", phase.data.finetune)]
    return [("data", phase.data)]


def _check_paths(plan: Plan, base_dir: Path) -> list[tuple[str, Any, str]]:
    problems = []
    if plan.model.path is not None and not (base_dir / plan.model.path / "config.json").is_file():
        problems.append(("model.path", plan.model.path, "a Hugging Face model folder with config.json"))
    if plan.model.tokenizer != "bytes" and not (base_dir / plan.model.tokenizer).is_dir():
        problems.append(("model.tokenizer", plan.model.tokenizer, "'bytes' or an existing tokenizer folder"))
    if plan.cluster.hostfile is not None and not (base_dir / plan.cluster.hostfile).is_file():
        problems.append(("cluster.hostfile", plan.cluster.hostfile, "an existing hostfile"))
    for i, phase in enumerate(plan.phases):
        for where, spec in _data_specs(phase):
            for k, f in enumerate(spec.files):
                if not (base_dir / f).is_file():
                    problems.append((f"phases[{i}].{where}.files[{k}]", f, "an existing file"))
    return problems


def _resolve_paths(plan: Plan, base_dir: Path) -> Plan:
    """Make file paths absolute so the worker finds them from any directory."""

    def absolute(p: str) -> str:
        return str((base_dir / p).resolve())

    def data(spec: DataSpec) -> DataSpec:
        return spec.model_copy(update={"files": [absolute(f) for f in spec.files]})

    phases = []
    for phase in plan.phases:
        if isinstance(phase.data, MultistepData):
            new_data = phase.data.model_copy(update={"pretrain": data(phase.data.pretrain), "finetune": data(phase.data.finetune)})
        else:
            new_data = data(phase.data)
        phases.append(phase.model_copy(update={"data": new_data}))
    model = plan.model
    updates = {}
    if model.path is not None:
        updates["path"] = absolute(model.path)
    if model.tokenizer != "bytes":
        updates["tokenizer"] = absolute(model.tokenizer)
    cluster = plan.cluster
    if cluster.hostfile is not None:
        cluster = cluster.model_copy(update={"hostfile": absolute(cluster.hostfile)})
    return plan.model_copy(update={"phases": phases, "model": model.model_copy(update=updates), "cluster": cluster})


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file; raises PlanError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise PlanError([("<file>", str(path), "an existing plan file")])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise PlanError([("<file>", str(path), f"valid YAML ({error})")]) from None
    return parse_plan(raw, path.parent)
