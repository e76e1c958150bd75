"""The plan file: one YAML that describes a whole training run as ordered phases.

Typed with pydantic v2. `load_plan` reads the YAML, merges each phase over the
plan's `defaults`, validates everything, and raises one `PlanError` that lists
every problem with the field path, the value and what is allowed.
No torch here: the orchestrator imports this.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from harness import data_check
from harness.task_metrics import MetricName

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


def _text(pattern: str, allowed: str) -> Any:
    """A str type whose value must match pattern in full; its error says what is allowed."""

    def check(value: str) -> str:
        if re.fullmatch(pattern, value) is None:
            raise ValueError(allowed)
        return value

    return Annotated[str, AfterValidator(check)]


# Plan values the harness writes into files and command lines (.deepspeed_env, hostfiles, sbatch
# scripts, the launcher's argv) must not add lines or options there; those a shell reads must be
# one plain word: DeepSpeed's pdsh runner puts the host list and `export KEY=VALUE;` for every
# .deepspeed_env line into a remote shell command, unquoted.
OneLine = _text(r"[^\n\r\0]*", "one line: no newline, carriage return or NUL")
ShellWord = _text(r"[^\s\0;&|<>()$`\\\"']*", "one shell word: no whitespace, quotes, NUL or ; & | < > ( ) $ ` \\ "
                  "(DeepSpeed's pdsh runner exports it unquoted in a remote shell)")
SECRET_IN_PLAN = ("secrets do not belong in the plan (it is copied into the run folder): "
                  "export it in the shell that runs harness")


def _not_secret(name: str) -> str:
    from harness.launch import is_secret  # launch imports this module (through stages)

    if is_secret(name):
        raise ValueError(SECRET_IN_PLAN)
    return name


EnvName = Annotated[_text(r"[A-Za-z_][A-Za-z0-9_]*", "a variable name: a letter or _, then letters, digits or _"), AfterValidator(_not_secret)]
HOST_PATTERN = r"[A-Za-z0-9_.:-]+"
HostName = _text(HOST_PATTERN, "a host name or address: letters, digits and . _ - : (no whitespace or shell metacharacters)")
HostSelection = _text(r"[A-Za-z0-9_.:@,-]+", "hosts and slots as DeepSpeed takes them (node1:0,1@node2): letters, digits and "
                      ". _ - : @ , (no whitespace or shell metacharacters)")
SbatchValue = _text(r"[^\s\0]+", "one word: no whitespace or NUL (an #SBATCH line takes one value)")
SlurmTime = _text(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|(?i:UNLIMITED|INFINITE)",
                  "a SLURM time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or UNLIMITED")


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
    """DeepSpeed hostfile ('host slots=N' lines, # comments), relative to the plan; pdsh only."""
    hosts: list[HostName] | None = None
    """Host list instead of a hostfile; pdsh only."""
    include: HostSelection | None = None
    exclude: HostSelection | None = None
    master_addr: HostName = "127.0.0.1"
    master_port: int | None = Field(None, ge=1024, le=65535)
    """First port to try; each phase takes the next free one (a reused port stalls init ~30 s)."""
    launcher_args: list[OneLine] = []
    """Extra arguments for the `deepspeed` launcher, passed as given."""
    env: dict[EnvName, ShellWord] = {}
    """Environment for every rank (written to .deepspeed_env for remote nodes). No secrets: the plan
    is copied into the run folder; export them in the shell that runs harness."""
    transitions: Literal["swap", "relaunch"] = "swap"
    """swap: consecutive stages on the same nodes and ranks per node share one launch; the running
    ranks hand off, tear the engine down and build the next stage's engine (seconds instead of a
    relaunch). relaunch: a fresh `deepspeed` launch for every stage."""


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
    """Also regularize biases and norm weights (1-D parameters), by penalty or as weight decay; off by default."""

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
    # ---- fine-tune row shapes and packing (harness/formats.py renders the rows) ----
    rows: Literal["prompt_response", "alpaca", "chat"] = "prompt_response"
    """finetune: what a row holds. prompt_response: two text columns (prompt_field, response_field),
    trained as prompt + response + end-of-sequence, no template. alpaca: instruction, optional input,
    output, optional system and history. chat: a list of messages, {role, content} with roles
    system/user/assistant, or sharegpt's {from, value} with human/gpt/system. alpaca and chat rows
    are rendered with the tokenizer's chat template (the built-in one when it has none, saved with the
    handoff model), with loss on every assistant turn and the end-of-turn token that closes it."""
    instruction_field: str = "instruction"
    """alpaca: the column with the instruction (the user turn)."""
    input_field: str = "input"
    """alpaca: the optional column with more context, appended to the instruction after a blank line."""
    output_field: str = "output"
    """alpaca: the column with the response (the assistant turn)."""
    system_field: str = "system"
    """alpaca: the optional column with a system prompt."""
    history_field: str = "history"
    """alpaca: the optional column with earlier turns, a list of [instruction, response] pairs (trained too)."""
    messages_field: str | None = None
    """chat: the column with the messages; unset: 'messages' or 'conversations' (sharegpt), whichever a row has."""
    packing: bool = False
    """finetune: lay the rows of each micro batch end to end in one sequence, without padding; each
    row attends only to itself and its positions restart at 0 (flash attention's variable-length
    path on GPU when flash-attn is installed, a block-diagonal mask otherwise). Rows per step, epochs
    and the loss are unchanged; the compute padding took is gone (raise micro_batch to use it)."""
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


# A selector of parameters: a shortcut, a layer range, a regex, or a glob (see TrainableSpec).
SELECTOR_SHORTCUTS = ("all", "embeddings", "head", "norms")
LAYER_RANGE = re.compile(r"layers\[(-?\d*)(:(-?\d*))?\]")


def _check_selector(selector: str) -> str:
    """A selector whose syntax is valid (whether it matches parameters is checked with the model)."""
    if selector.startswith("re:"):
        try:
            re.compile(selector[3:])
        except re.error as error:
            raise ValueError(f"a valid regular expression after 're:' ({error})") from None
    elif selector.startswith("layers[") and ((match := LAYER_RANGE.fullmatch(selector)) is None or match[2] is None and not match[1]):
        raise ValueError("a layer range like layers[:2] (first 2), layers[-2:] (last 2), layers[1:3] or layers[0]")
    elif not selector.strip():
        raise ValueError("a non-empty selector")
    return selector


Selector = Annotated[str, AfterValidator(_check_selector)]


class TrainableSpec(Strict):
    """Which parameters a phase (or a multistep stage) trains, and at what learning rate; every
    other parameter is frozen for it (out of the optimizer, unchanged, no penalty). A selector is
    one of: `all`; `embeddings` (token and position embeddings); `head` (the output head; on a model
    with tied embeddings it is the shared matrix); `norms` (every normalization layer); `layers[a:b]`
    (decoder layers by index, Python slice: layers[:2] first 2, layers[-2:] last 2, layers[3]);
    `re:<regex>` (matched against the whole parameter name); anything else is a glob on the
    parameter name (`*.mlp.*`). Shortcuts are found from the model itself (its embedding modules,
    output embeddings, norm classes, decoder layer list), so they work for Llama, Qwen2, GPT-2 and
    similar families. A selector that matches no parameter is a plan error that lists real names."""

    train: list[Selector] = ["all"]
    """Parameters that train: the union of these selectors."""
    freeze: list[Selector] = []
    """Parameters taken out of `train` again (e.g. train [all], freeze [embeddings])."""
    lr_scale: dict[Selector, float] = {}
    """Learning-rate multiplier per selector, e.g. {embeddings: 0.1}; a parameter may match one entry
    at most. The stage's scheduler scales every group alike."""
    layer_decay: float = Field(1.0, gt=0, le=1)
    """Layer-wise lr decay: decoder layer k (1..L, from the bottom) trains at lr x layer_decay^(L-k),
    the embeddings at lr x layer_decay^L, the head and final norm at lr. Multiplies lr_scale."""

    @field_validator("lr_scale")
    @classmethod
    def _positive_scales(cls, scales: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in scales.items() if not v > 0}
        if bad:
            raise ValueError(f"multipliers > 0 (freeze a part with `freeze:` instead); got {bad}")
        return scales

    @property
    def is_default(self) -> bool:
        """Every parameter trains, in one group at the stage's lr."""
        return self == TrainableSpec()


class FastParts(Strict):
    """The parts of the fast path, each on or off on its own (harness/fast.py resolves them per
    stage, harness/worker/fast.py applies them). A part that fails to initialise on a rank is turned
    off with a one-line warning naming it, and the run goes on without it."""

    compile: bool = False
    """torch.compile of the model through DeepSpeed's engine.compile() (inductor). Its cost is the
    first step of a launch's first compiled stage; a swapped-in stage of the same shapes reuses the
    graphs, a relaunched one compiles again (bench/transition.py). Weights, checkpoints and handoff
    are unchanged."""
    deepcompile: bool = False
    """DeepSpeed's DeepCompile (`"compile": {"deepcompile": true}`, then engine.compile()): ZeRO's
    communication scheduled inside the compiled graph. CUDA only; implies compile."""
    liger: bool = False
    """Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy: the logits
    are never materialized) for the model families liger-kernel patches. CUDA only; needs the
    optional extra: pip install 'phased-harness[gpu]'."""
    attention: Literal["auto", "sdpa", "flash", "eager"] = "auto"
    """auto: flash attention 2 on CUDA in bf16/fp16 when flash-attn is installed, else PyTorch SDPA.
    flash falls back to sdpa where flash-attn is missing or on CPU."""


def _micro_batch(value: Any) -> Any:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError("a whole number >= 1, or auto (the largest that fits, found at the stage's start)")


def _fast(value: Any) -> Any:
    """A mapping is read as FastParts here, so a misspelt part gets one error, not one per form."""
    if value in ("auto", "off") or isinstance(value, FastParts):
        return value
    if isinstance(value, dict):
        try:
            return FastParts.model_validate(value)
        except ValidationError as error:
            raise ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
                             + " (parts: compile, deepcompile, liger: true/false; attention: auto/sdpa/flash/eager)") from None
    raise ValueError("auto, off, or a mapping of parts (compile, deepcompile, liger: true/false; attention: auto/sdpa/flash/eager)")


MicroBatch = Annotated[int | Literal["auto"], BeforeValidator(_micro_batch)]
Fast = Annotated[Literal["auto", "off"] | FastParts, BeforeValidator(_fast)]


class TrainSettings(Strict):
    """Settings a phase (and a multistep stage) may set; unset ones come from defaults."""

    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    """finetune only: passes over the training rows."""
    tokens: int | None = Field(None, ge=1)
    """Token budget: steps = ceil(tokens / (global_batch * seq_len))."""
    seq_len: int = Field(128, ge=8)
    micro_batch: MicroBatch = 4
    """Samples per forward on each rank; `auto`: the largest that fits, found by a short probe at
    the stage's start (harness/worker/batch_probe.py), with global_batch kept by the accumulation
    steps; the choice is recorded in the stage's micro_batch.json and manifest."""
    global_batch: int | None = Field(None, ge=1)
    """Samples per optimizer step; must equal micro_batch x grad_accum x world size. Default: micro_batch x world
    (micro_batch auto needs it given)."""
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
    eval_on_start: bool = False
    """Also evaluate before the stage's first step (logged as stage_step 0): what the previous stage
    handed over, e.g. a task metric after pretraining next to the same metric after fine-tuning.
    Skipped when the stage resumes past step 0."""
    task_metrics: list[MetricName] = ["exact_match"]
    """Metrics of greedy generation on held-out fine-tune rows, at every eval (stages with fine-tune
    data): exact_match and f1 (SQuAD-normalised, QA), bleu and chrf (sacrebleu, translation),
    rouge (rouge-score ROUGE-1/2/L, summarization); [] generates nothing. See harness/task_metrics.py."""
    task_rows: int = Field(16, ge=1)
    """Held-out rows generated for task_metrics: the first task_rows of the held-out set (at most
    its size: data.eval_fraction of the rows, capped at data.eval_max_samples)."""
    max_new_tokens: int = Field(64, ge=1)
    """Generation length: greedy tokens per row at most; a row stops at end-of-sequence, and
    generation stops when every row of the batch on every rank has."""
    generation_batch: int = Field(8, ge=1)
    """Rows generated together (left-padded) per forward on each rank."""
    generation_gather: bool = True
    """ZeRO-3: gather every parameter once for the whole generation instead of once per layer and
    per forward (trl PR #1483 measured ~10x). Costs, while it generates, the full model on every
    rank (parameters x bytes per parameter of the training dtype: 4 in fp32, 2 in bf16) on top of
    the rank's shards; false keeps ZeRO-3's partitioned memory for a model that fits only that way."""
    log_every: int = Field(1, ge=1)
    seed: int = 1234
    nodes: int | None = Field(None, ge=1)
    """Override cluster.nodes for this phase (world size may change between phases)."""
    procs_per_node: int | None = Field(None, ge=1)
    """Override cluster.procs_per_node for this phase."""
    fast: Fast = "auto"
    """The fast path: compilation, fused kernels, attention kernel (see FastParts). auto: what
    harness/fast.py's AUTO table turns on for the accelerator (`harness plan` shows it per stage);
    off: eager PyTorch with SDPA attention; or the parts, e.g. {compile: true, liger: true}."""
    # ---- what trains (issue 10) ----
    trainable: TrainableSpec = TrainableSpec()
    """Which parameters train and their learning-rate groups (see TrainableSpec); default: all, one group."""
    deepspeed: dict[str, Any] = {}
    """Raw DeepSpeed config merged last over the generated one, or the path of a DeepSpeed JSON file
    (relative to the plan; read at load), e.g. LLaMA-Factory's or axolotl's ds_z3_config.json.
    "auto" takes the generated value at the same key (see ds_config.merge_deepspeed_block); keys the
    plan decides (batch sizes, precision, ZeRO stage, optimizer and scheduler type) may only be
    "auto" or repeat the plan's value, except that the block's zero_optimization.stage is the
    zero_stage when the plan sets none."""

    @model_validator(mode="after")
    def _auto_micro_batch_has_global_batch(self) -> TrainSettings:
        if self.micro_batch == "auto" and self.global_batch is None:
            raise ValueError("micro_batch auto keeps the global batch while it picks the micro batch: set global_batch")
        return self

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
    kind: Literal["pretrain", "finetune", "multistep"]
    data: DataSpec | MultistepData
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

    partition: SbatchValue | None = None
    account: SbatchValue | None = None
    qos: SbatchValue | None = None
    time: SlurmTime = "01:00:00"
    """Time limit per job (sbatch --time): MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED."""
    gpus_per_node: int | None = Field(None, ge=0)
    """Default: procs_per_node on GPU clusters, none on CPU."""
    cpus_per_task: int | None = Field(None, ge=1)
    preempt_grace_s: int = Field(120, ge=10)
    """SLURM sends USR1 this long before the time limit: the ranks checkpoint and the job requeues."""
    max_requeues: int = Field(20, ge=0)
    extra: list[OneLine] = []
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
    """Every problem found in a plan, each as (field path, value, what is allowed). A problem found
    twice (a multistep stage is checked once per cycle) is listed once."""

    def __init__(self, problems: list[tuple[str, Any, str]]):
        self.problems = list({(path, repr(value), allowed): (path, value, allowed) for path, value, allowed in problems}.values())
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
    """The problems of a pydantic error about raw (the input it validated), their paths under prefix."""
    problems = []
    for item in error.errors():
        if _other_data_form(item["loc"], raw):
            continue
        msg = item["msg"].removeprefix("Value error, ")
        problems.append((_field_path(item["loc"], raw, prefix), item.get("input", raw), msg))
    return problems


def _field_path(loc: tuple, raw: Any, prefix: str) -> str:
    """The plan field an error location names, e.g. 'phases[0].data.files[1]'. Besides the keys and
    indexes of the input, pydantic's locations hold labels, which are dropped: the branch of a union
    ('MultistepData', "literal['alternate']", 'function-after[_one_source(), DataSpec]') and '[key]'
    for a mapping's key. A name the input lacks is a missing field when it comes last."""
    path, node = prefix, raw
    for k, part in enumerate(loc):
        if isinstance(node, list) and isinstance(part, int) and part < len(node):
            path, node = f"{path}[{part}]", node[part]
        elif isinstance(node, dict) and (part in node or k == len(loc) - 1 and str(part).isidentifier()):
            path, node = f"{path}.{part}" if path else str(part), node.get(part)
    return path


def _other_data_form(loc: tuple, raw: Any) -> bool:
    """Whether an error is about the form of data the phase's kind does not take. PhaseSpec.data is
    a union, so pydantic says what is wrong with the data both as one data set (DataSpec) and as
    multistep's pair (MultistepData); the user meant the form their phase's kind takes."""
    if len(loc) < 4 or loc[0] != "phases" or loc[2] != "data":
        return False
    meant = "MultistepData" if raw["phases"][loc[1]].get("kind") == "multistep" else "DataSpec"
    return meant not in str(loc[3])


def parse_plan(raw: Any, base_dir: Path) -> Plan:
    """Validate a plan given as plain data; relative file paths resolve against base_dir. Raises one
    PlanError with every problem: the schema's, and those found in each block that is valid on its
    own (the model, the cluster and its hostfile, each phase's stages and data files), so fixing
    one problem does not reveal the next."""
    if not isinstance(raw, dict):
        raise PlanError([("", raw, "a plan is a mapping with name, model, phases")])
    raw = copy.deepcopy(raw)  # filled in below: the defaults, and deepspeed blocks read from files
    defaults = raw.pop("defaults", {}) or {}
    if not isinstance(defaults, dict):
        raise PlanError([("defaults", defaults, "a mapping of phase settings")])
    problems = _read_deepspeed_files([("defaults", defaults), *_settings_blocks(raw.get("phases"))], base_dir)
    phases = raw.get("phases") if isinstance(raw.get("phases"), list) else []
    if phases:
        raw["phases"] = phases = [deep_merge(defaults, p) if isinstance(p, dict) else p for p in phases]
        for _, settings in _settings_blocks(phases):
            _zero_stage_from_block(settings)
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as error:
        plan = None
        problems += _problems_from(error, "", raw)
    model = plan.model if plan else _valid(ModelSpec, raw.get("model"))
    cluster = plan.cluster if plan else _valid(ClusterSpec, raw.get("cluster", {}))
    if model is not None:
        model, model_problems = resolve_model(model, base_dir)
        problems += model_problems
    if cluster is not None:
        problems += _check_cluster(cluster, base_dir)
    for i, phase in enumerate(plan.phases if plan else [_valid(PhaseSpec, p) for p in phases]):
        if phase is not None:
            problems += _check_phase(i, phase, base_dir)
    if problems:
        raise PlanError(problems)
    return _resolve_paths(plan.model_copy(update={"model": model}), base_dir)


def _valid(model: type[Strict], value: Any) -> Any:
    """value as model, or None when it is not valid (the plan's validation lists its problems)."""
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


def _settings_blocks(phases: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(field path, mapping) of every block of training settings in the raw phases: each phase,
    and each stage of a multistep phase."""
    for i, phase in enumerate(phases if isinstance(phases, list) else []):
        if isinstance(phase, dict):
            yield f"phases[{i}]", phase
            stages = phase.get("stages")
            for j, stage in enumerate(stages if isinstance(stages, list) else []):
                if isinstance(stage, dict):
                    yield f"phases[{i}].stages[{j}]", stage


def _read_deepspeed_files(blocks: list[tuple[str, dict[str, Any]]], base_dir: Path) -> list[tuple[str, Any, str]]:
    """Replace each `deepspeed:` value that is a path by the JSON object in that file (relative to
    the plan); the problems of those that cannot be read."""
    problems = []
    for where, settings in blocks:
        value = settings.get("deepspeed")
        if not isinstance(value, str):
            continue
        path = base_dir / os.path.expanduser(value)
        try:
            block = json.loads(path.read_text())
            why = "" if isinstance(block, dict) else f"{path} holds a JSON {type(block).__name__}"
        except OSError as error:
            why = f"{path} cannot be read ({error.strerror})"
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            why = f"{path} is not valid JSON ({error})"
        if why:
            problems.append((f"{where}.deepspeed", value, f"a mapping, or a DeepSpeed JSON file (relative to the plan) holding an object: {why}"))
            del settings["deepspeed"]  # reported here; the schema would report the path again
        else:
            settings["deepspeed"] = block
    return problems


def _zero_stage_from_block(settings: dict[str, Any]) -> None:
    """A deepspeed block that sets zero_optimization.stage (a pasted ds_z3_config.json) gives the
    zero_stage when the plan sets none; when both are set, they must agree (ds_config checks it, and
    reports a stage that is no ZeRO stage at the block's key)."""
    block = settings.get("deepspeed")
    zero = block.get("zero_optimization") if isinstance(block, dict) else None
    if isinstance(zero, dict) and zero.get("stage") in (0, 1, 2, 3):
        settings.setdefault("zero_stage", zero["stage"])


# DeepSpeed's hostfile line: a host, then slots=N (its GPUs, or CPU ranks); # starts a comment.
HOSTFILE_LINE = re.compile(rf"({HOST_PATTERN})\s+slots=([1-9]\d*)")


def _check_cluster(cluster: ClusterSpec, base_dir: Path) -> list[tuple[str, Any, str]]:
    """Cluster settings that cannot work: pdsh without hosts, a hostfile DeepSpeed would refuse.
    (Several nodes on the local launcher, a phase's own nodes included, are found with the stages.)"""
    problems = []
    if cluster.launcher == "pdsh" and not (cluster.hostfile or cluster.hosts):
        problems.append(("cluster.launcher", cluster.launcher, "pdsh starts ranks on the hosts it is given: set cluster.hostfile or cluster.hosts"))
    if cluster.hostfile is not None:
        problems += [("cluster.hostfile", cluster.hostfile, why) for why in _hostfile_problems(base_dir / cluster.hostfile)]
    return problems


def _hostfile_problems(path: Path) -> list[str]:
    """What DeepSpeed's launcher would refuse in a hostfile, or a shell would read as more than a
    host name, each with its line number."""
    if not path.is_file():
        return [f"an existing hostfile ({path} is not a file)"]
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        return [f"a readable text file ({path}: {error})"]
    problems, first_line = [], {}
    for n, line in enumerate(lines, 1):
        text = line.split("#")[0].strip()
        if not text:
            continue
        match = HOSTFILE_LINE.fullmatch(text)
        if match is None:
            problems.append(f"line {n} of {path}: {line.strip()!r} is not 'host slots=N' (N >= 1; # starts a comment)")
        elif match[1] in first_line:
            problems.append(f"line {n} of {path}: host {match[1]} is listed again (first on line {first_line[match[1]]})")
        else:
            first_line[match[1]] = n
    if not first_line and not problems:
        problems.append(f"{path} lists no host: one 'host slots=N' line per node")
    return problems


def _check_phase(i: int, phase: PhaseSpec, base_dir: Path) -> list[tuple[str, Any, str]]:
    """Rules of a phase beyond its schema: each multistep stage merged over the phase, the length,
    the data files (they exist, and a sample of each reads as the phase's kind needs)."""
    problems = []
    for j in range(len(phase.stages)):
        try:
            phase.stage_settings(j)
        except ValidationError as error:
            problems += _problems_from(error, f"phases[{i}].stages[{j}]", phase.stage_input(j))
    if phase.kind == "pretrain" and phase.epochs is not None:
        problems.append((f"phases[{i}].epochs", phase.epochs, "pretrain phases take steps or tokens (packed blocks are counted only after tokenizing)"))
    if phase.kind != "multistep":
        given = [k for k in ("steps", "epochs", "tokens") if getattr(phase, k) is not None]
        if len(given) != 1:
            problems.append((f"phases[{i}]", given, "give exactly one of steps, epochs, tokens"))
    for where, kind, spec in _data_specs(phase):
        for k, pattern in enumerate(spec.files):
            files = expand_files([pattern], base_dir)
            if not files:
                problems.append((f"phases[{i}].{where}.files[{k}]", pattern, "an existing file, or a glob that matches files"))
            for file in files:
                why = data_check.file_problem(file, spec, kind)
                if why is not None:
                    problems.append((f"phases[{i}].{where}.files[{k}]", file, why))
    return problems


def _data_specs(phase: PhaseSpec) -> list[tuple[str, str, DataSpec]]:
    """(field path in the phase, kind of rows, data set) of each data set of a phase."""
    if isinstance(phase.data, MultistepData):
        return [("data.pretrain", "pretrain", phase.data.pretrain), ("data.finetune", "finetune", phase.data.finetune)]
    return [("data", phase.kind, phase.data)]


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
