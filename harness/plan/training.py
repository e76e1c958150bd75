"""The training settings a phase (and each multistep stage) takes: optimizer, schedule, precision,
ZeRO and offload, regularization, which parameters train, the fast path, evaluation, handoff."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, field_validator, model_validator

from harness.plan.fields import Strict

# Metrics of greedy generation on held-out fine-tune rows (scored in harness/objectives/task_metrics.py).
MetricName = Literal["exact_match", "f1", "bleu", "chrf", "rouge"]

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
    """The parts of the fast path, each on or off on its own (harness/stages/fast.py resolves them per
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
    rouge (rouge-score ROUGE-1/2/L, summarization); [] generates nothing. See harness/objectives/task_metrics.py."""
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
    hang_timeout: float | None = Field(None, gt=0)
    """Seconds a rank may go without progress (a step, an eval, a checkpoint save...) before the
    launch is judged hung: every rank's Python stack goes to its log, the launch is ended and the
    stage fails naming the stuck rank(s). Default: the larger of 300 and 20 x the slowest step seen.
    Starting, building, the micro batch probe, reference passes, the first step (compiling),
    evals, checkpoint saves and the handoff get six times as long."""
    nonfinite_steps: int = Field(3, ge=1)
    """Stop the stage when the training loss is NaN or infinite this many steps in a row (no
    checkpoint is saved while it is not finite; the message names the last finite loss and the
    checkpoint a rerun resumes from)."""
    nodes: int | None = Field(None, ge=1)
    """Override cluster.nodes for this phase (world size may change between phases)."""
    procs_per_node: int | None = Field(None, ge=1)
    """Override cluster.procs_per_node for this phase."""
    fast: Fast = "auto"
    """The fast path: compilation, fused kernels, attention kernel (see FastParts). auto: what
    harness/stages/fast.py's AUTO table turns on for the accelerator (`harness plan` shows it per stage);
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
