"""The plan file: one YAML that describes a whole training run as ordered phases.

Typed with pydantic v2. `load_plan` reads the YAML, merges each phase over the
plan's `defaults`, validates everything, and raises one `PlanError` that lists
every problem with the field path, the value and what is allowed.
No torch here: the orchestrator imports this.
"""
from __future__ import annotations

import copy
import glob
import os
import re
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


# Llama-shaped configs small enough for CPU tests and the demo.
BUILTIN_CONFIGS = {
    "tiny-llama": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small-llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
}


class ModelSpec(Strict):
    """Which model to train: a built-in tiny config, a local Hugging Face folder or a hub model id.
    After load_plan, path and tokenizer are local folders (or 'bytes'): the worker never downloads."""

    builtin: Literal["tiny-llama", "small-llama"] | None = None
    """A named Llama-shaped config built with transformers (random init)."""
    path: str | None = None
    """A local Hugging Face model folder (config.json + weights), or a hub model id 'org/name'
    when no such folder exists: resolved at plan load to its snapshot folder in the Hugging Face
    cache (HF_HOME / HF_HUB_CACHE), downloaded first unless HF_HUB_OFFLINE is set. Every node
    must see that folder (a shared cache on multi-node runs)."""
    tokenizer: str | None = None
    """'bytes' (built-in byte-level tokenizer), a tokenizer folder or hub id; unset: the model's
    own (its path's folder must hold tokenizer files), or bytes for a builtin model."""

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
    """One data set: local files (text, jsonl, parquet, compressed jsonl/text) or a hub name when online.
    Tokenized once into a token store (see harness/token_store.py) that every rank reads rows from."""

    files: list[str] = []
    """Files or globs ("shards/*.jsonl.gz"), relative to the plan; globs expand in sorted order."""
    hub: str | None = None
    """A Hugging Face hub dataset name, streamed while tokenizing (needs a network)."""
    split: str = "train"
    """hub: the split to read."""
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
        """'text', 'json' or 'parquet'; a compressed file by the suffix under .gz, .bz2, .xz or .zst."""
        if self.format != "auto" or not self.files:
            return self.format
        name = self.files[0].lower()
        for compressed in (".gz", ".bz2", ".xz", ".zst"):
            name = name.removesuffix(compressed)
        return {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(Path(name).suffix, "text")


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
    keep_checkpoints: int = Field(2, ge=1)
    """Complete DeepSpeed checkpoints kept per stage: older ones are deleted once a newer one is
    complete. The newest is what a resume and the next stage's full_state load use."""
    handoff_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """dtype of the handoff's Hugging Face weights. auto: bf16 on GPU, fp32 on CPU. The manifest's
    weights_digest is of the fp32 master weights either way."""
    handoff_shard_bytes: int = Field(5_000_000_000, ge=1)
    """Largest safetensors file of the handoff model; more weights go to several files plus
    model.safetensors.index.json. Writing streams tensor by tensor, so this costs no memory."""
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
    cache_dir: str | None = None
    """Where token stores are kept, shared by every run that names the same folder (default
    $XDG_CACHE_HOME/harness, i.e. ~/.cache/harness). Put it on a shared file system for multi-node runs."""
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
    model, model_problems = resolve_model(plan.model, base_dir)
    problems += model_problems + _check_paths(plan, base_dir)
    if problems:
        raise PlanError(problems)
    return _resolve_paths(plan.model_copy(update={"model": model}), base_dir)


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
    if plan.cluster.hostfile is not None and not (base_dir / plan.cluster.hostfile).is_file():
        problems.append(("cluster.hostfile", plan.cluster.hostfile, "an existing hostfile"))
    for i, phase in enumerate(plan.phases):
        for where, spec in _data_specs(phase):
            for k, pattern in enumerate(spec.files):
                if not expand_files([pattern], base_dir):
                    problems.append((f"phases[{i}].{where}.files[{k}]", pattern, "an existing file, or a glob that matches files"))
    return problems


def expand_files(patterns: list[str], base_dir: Path) -> list[str]:
    """Absolute paths of the files the patterns name; a glob expands in sorted order."""
    files = []
    for pattern in patterns:
        path = str(base_dir / os.path.expanduser(pattern))
        matches = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else [path]
        files += [str(Path(m).resolve()) for m in matches if os.path.isfile(m)]
    return files


def resolve_model(model: ModelSpec, base_dir: Path) -> tuple[ModelSpec, list[tuple[str, Any, str]]]:
    """The model with local folders only: a path made absolute, a hub id replaced by its snapshot
    folder in the Hugging Face cache, an unset tokenizer set to the model's own folder (bytes for
    a builtin); and the problems found on the way."""
    problems = []
    path = None
    if model.path is not None:
        path, why = _local_folder(model.path, base_dir)
        if path is not None and not (Path(path) / "config.json").is_file():
            path, why = None, f"a Hugging Face model folder with config.json ({path} has none)"
        if path is None:
            problems.append(("model.path", model.path, why))
    tokenizer = model.tokenizer
    if tokenizer is None and model.builtin is not None:
        tokenizer = "bytes"
    elif tokenizer is None and path is not None:
        tokenizer = path
        if not _has_tokenizer(Path(path)):
            problems.append(("model.tokenizer", None, f"unset, so the model's own tokenizer, but {path} has no tokenizer files "
                             f"({', '.join(TOKENIZER_FILES)}): give `tokenizer: bytes` (the built-in byte tokenizer) or a tokenizer folder"))
    elif tokenizer is not None and tokenizer != "bytes":
        tokenizer, why = _local_folder(model.tokenizer, base_dir)
        if tokenizer is None:
            problems.append(("model.tokenizer", model.tokenizer, f"'bytes' or a tokenizer folder: {why}"))
    return model.model_copy(update={"path": path, "tokenizer": tokenizer}), problems


# A hub model id: 'org/name' (a relative path of two parts that does not exist locally reads as one).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# Not needed to train with transformers: other frameworks' weights, and Llama's original/ checkpoint.
HUB_IGNORED = ["*.onnx", "onnx/*", "*.h5", "*.msgpack", "*.tflite", "*.ot", "*.gguf", "original/*", "coreml/*", "openvino/*"]


def _local_folder(value: str, base_dir: Path) -> tuple[str | None, str]:
    """(absolute folder, '') for an existing local folder or a hub id the cache has (downloaded
    first unless offline); (None, why not) otherwise."""
    local = base_dir / os.path.expanduser(value)
    if local.is_dir():
        return str(local.resolve()), ""
    if not HUB_ID.match(value):
        return None, f"an existing folder ({local} is not one) or a hub model id 'org/name'"
    return _hub_snapshot(value)


def _hub_snapshot(repo_id: str) -> tuple[str | None, str]:
    # Imported here: only plans that name a hub id pay for it.
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = constants.is_offline_mode()
    not_local = f"not a local folder, so read as a hub model id: '{repo_id}'"
    try:
        return snapshot_download(repo_id, local_files_only=offline, ignore_patterns=HUB_IGNORED), ""
    except LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE is set" if offline else "it could not be downloaded (no network?)"
        return None, (f"{not_local} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}; "
                      f"download it first with `hf download {repo_id}` (same HF_HOME or HF_HUB_CACHE), or give a local folder")
    except GatedRepoError:
        return None, f"{not_local} is gated: accept its terms on huggingface.co and log in (`hf auth login` or HF_TOKEN)"
    except RepositoryNotFoundError:
        return None, f"{not_local} does not exist on the hub (or is private: log in with `hf auth login` or HF_TOKEN)"
    except (HfHubHTTPError, OSError) as error:
        return None, f"{not_local} could not be downloaded: {error}"


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.tiktoken"))


def _resolve_paths(plan: Plan, base_dir: Path) -> Plan:
    """Make file paths absolute so the worker finds them from any directory."""

    def absolute(p: str) -> str:
        return str((base_dir / p).resolve())

    def data(spec: DataSpec) -> DataSpec:
        return spec.model_copy(update={"files": expand_files(spec.files, base_dir)})

    phases = []
    for phase in plan.phases:
        if isinstance(phase.data, MultistepData):
            new_data = phase.data.model_copy(update={"pretrain": data(phase.data.pretrain), "finetune": data(phase.data.finetune)})
        else:
            new_data = data(phase.data)
        phases.append(phase.model_copy(update={"data": new_data}))
    cluster = plan.cluster
    if cluster.hostfile is not None:
        cluster = cluster.model_copy(update={"hostfile": absolute(cluster.hostfile)})
    cache_dir = absolute(os.path.expanduser(plan.cache_dir)) if plan.cache_dir else str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "harness")
    return plan.model_copy(update={"phases": phases, "cluster": cluster, "cache_dir": cache_dir})


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
