"""The training settings a phase (and each multistep stage) takes: optimizer, schedule, precision,
ZeRO and offload, regularization, which parameters train, the fast path, evaluation, handoff."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, model_validator

from harness.plan.fields import Strict
from harness.plan.trainable import TrainableSpec

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
    """AdamW, Adam, SGD, Adagrad, RMSprop, Lamb or Lion, spelled in any case (sgd, adamw). On CPU
    Lamb and Lion need offload.optimizer (they fail on CPU in DeepSpeed 0.19.8)."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate; the scheduler shapes it, trainable.lr_scale and layer_decay scale it per group."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay (decoupled for AdamW); regularization with l2_mode weight_decay sets it instead."""
    betas: tuple[float, float] | None = None
    """Adam, AdamW, Lamb, Lion: the moment coefficients; unset: the optimizer's own default."""
    eps: float | None = Field(None, gt=0)
    """Adam, AdamW, Adagrad, Lamb, RMSprop: the denominator's epsilon; unset: the optimizer's own default."""
    momentum: float | None = Field(None, ge=0, lt=1)
    """SGD, RMSprop: momentum; unset: none."""
    nesterov: bool | None = None
    """SGD: Nesterov momentum (needs momentum > 0)."""
    dampening: float | None = Field(None, ge=0)
    """SGD: dampening of the momentum."""
    alpha: float | None = Field(None, gt=0)
    """RMSprop: the smoothing constant."""

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
    """DeepSpeed's schedulers. none: a constant lr; WarmupLR: a linear warmup, then constant;
    WarmupDecayLR: the warmup, then a linear decay to 0; WarmupCosineLR: the warmup, then a cosine down
    to min_lr_ratio; OneCycle: up to lr over the first half, down to min_lr_ratio x lr over the second.
    Their length is the stage's steps (span: phase: the phase's)."""
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    """Fraction of the stage's steps spent warming up."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """WarmupCosineLR's floor and OneCycle's lowest lr, as a fraction of the peak lr."""
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
    """penalty: l2 x sum(w^2) added to the loss (under ZeRO-3 each rank adds its shard's gradient and the
    values are summed across ranks); weight_decay: l2 passed to the optimizer as its weight decay, on
    the same parameters."""
    include_1d: bool = False
    """Also regularize biases and norm weights (1-D parameters), by penalty or as weight decay; off by default."""

    @property
    def active(self) -> bool:
        return self.l1 > 0 or (self.l2 > 0 and self.l2_mode == "penalty")



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


PreferenceLoss = Literal["dpo", "ipo", "simpo", "orpo"]
# What each loss takes besides beta (PreferenceSpec): its own knob, None when the loss has none.
LOSS_KNOBS = {"dpo": "label_smoothing", "ipo": None, "simpo": "gamma", "orpo": "orpo_lambda"}


class PreferenceSpec(Strict):
    """How a preference phase (kind: preference) trains on pairs of a chosen and a rejected response
    to one prompt (harness/worker/objectives/preference.py has the formulas). pi(y) is the policy's
    log-probability of a response (its tokens and end of turn), summed for dpo and averaged per
    token for ipo, simpo and orpo (as TRL and LLaMA-Factory do); ref(y) the same under the weights
    the phase starts from, computed once at its start (dpo and ipo only)."""

    loss: PreferenceLoss = "dpo"
    """dpo: -log sigmoid(beta x), x = (pi(chosen) - ref(chosen)) - (pi(rejected) - ref(rejected)) (sigmoid
    DPO, Rafailov et al. 2023); ipo: (x - 1 / (2 beta))^2 on per-token averages (Azar et al. 2023);
    simpo: -log sigmoid(beta (pi(chosen) - pi(rejected)) - gamma), reference-free, length-normalised
    (Meng et al. 2024); orpo: -pi(chosen) + orpo_lambda x -log sigmoid(log odds(chosen) - log odds(rejected)),
    reference-free, with the chosen response's SFT term (Hong et al. 2024)."""
    beta: float = Field(0.1, gt=0)
    """The inverse temperature of dpo, ipo and simpo; the logged rewards are beta x the log-ratios (dpo,
    ipo) or beta x pi (simpo, orpo)."""
    label_smoothing: float | None = Field(None, ge=0, lt=0.5)
    """dpo only: the assumed share of flipped labels (conservative DPO, cDPO): the loss becomes
    (1 - e) x -log sigmoid(beta x) + e x -log sigmoid(-beta x). Default 0 (plain DPO)."""
    gamma: float | None = Field(None, ge=0)
    """simpo only: the target reward margin (TRL's simpo_gamma). Default 0.5."""
    orpo_lambda: float | None = Field(None, gt=0)
    """orpo only: the weight of the odds-ratio term against the SFT term (TRL's ORPO beta). Default 0.1."""

    @model_validator(mode="after")
    def _knobs_fit_loss(self) -> PreferenceSpec:
        given = [knob for knob in ("label_smoothing", "gamma", "orpo_lambda") if getattr(self, knob) is not None]
        wrong = [knob for knob in given if knob != LOSS_KNOBS[self.loss]]
        if wrong:
            takes = LOSS_KNOBS[self.loss]
            raise ValueError(f"{self.loss} does not take {wrong}; it takes beta{f' and {takes}' if takes else ''} "
                             f"({', '.join(f'{knob}: {loss}' for loss, knob in LOSS_KNOBS.items() if knob)})")
        return self

    @property
    def uses_reference(self) -> bool:
        """dpo and ipo compare with the start weights' log-probabilities; simpo and orpo need none."""
        return self.loss in ("dpo", "ipo")

    def knob(self, name: str) -> float:
        """label_smoothing, gamma or orpo_lambda, with its default when unset."""
        value = getattr(self, name)
        return {"label_smoothing": 0.0, "gamma": 0.5, "orpo_lambda": 0.1}[name] if value is None else value


def _micro_batch(value: Any) -> Any:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError("a whole number >= 1, or auto (the largest that fits, found at the stage's start)")


def _word_or_block(block: type[Strict], words: tuple[str, ...], keys: str) -> Any:
    """A validator for `word | block` fields: a mapping is read as `block` here, so a misspelt key gets
    one error naming the keys (e.g. 'parts (compile: true/false, ...)'), not one per form of the union."""
    def validate(value: Any) -> Any:
        if value in words or isinstance(value, block):
            return value
        if isinstance(value, dict):
            try:
                return block.model_validate(value)
            except ValidationError as error:
                raise ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()) + f"; the {keys}") from None
        raise ValueError(f"{', '.join(words)}, or a mapping of {keys}")

    return validate


MicroBatch = Annotated[int | Literal["auto"], BeforeValidator(_micro_batch)]
Offload = Annotated[Literal["auto"] | OffloadSpec, BeforeValidator(_word_or_block(OffloadSpec, ("auto",), "keys (optimizer, params: true/false)"))]
Fast = Annotated[Literal["auto", "off"] | FastParts, BeforeValidator(_word_or_block(
    FastParts, ("auto", "off"), "parts (compile, deepcompile, liger: true/false; attention: auto/sdpa/flash/eager)"))]


class TrainSettings(Strict):
    """Settings a phase (and a multistep stage) may set; unset ones come from defaults."""

    steps: int | None = Field(None, ge=1)
    """Length in optimizer steps. A phase (or stage) gives steps, tokens, or (finetune, local files)
    epochs; when it gives several, steps wins, then tokens."""
    epochs: float | None = Field(None, gt=0)
    """finetune only: passes over the training rows."""
    tokens: int | None = Field(None, ge=1)
    """Token budget: steps = ceil(tokens / (global_batch * seq_len))."""
    seq_len: int = Field(128, ge=8)
    """Tokens per sample: pretrain text is packed into blocks of seq_len; fine-tune rows are cut to it."""
    micro_batch: MicroBatch = 4
    """Samples per forward on each rank; `auto`: the largest that fits, found by a short probe at
    the stage's start (harness/worker/batch_probe.py), with global_batch kept by the accumulation
    steps; the choice is recorded in the stage's micro_batch.json and manifest."""
    global_batch: int | None = Field(None, ge=1)
    """Samples per optimizer step; must equal micro_batch x grad_accum x world size. Default: micro_batch x world
    (micro_batch auto needs it given)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    zero_stage: Literal[0, 1, 2, 3, "auto"] = 2
    """DeepSpeed ZeRO stage: 0 plain data parallel; 1 optimizer states partitioned across ranks; 2
    gradients too; 3 parameters too (the model is built partitioned). It may change between phases.
    auto: the lowest whose per-rank memory estimate fits with a 10% margin (lower stages communicate
    less; harness/stages/fit.py). `harness plan` shows the estimate and the choice."""
    offload: Offload = OffloadSpec()
    """ZeRO offload of optimizer states (and parameters at ZeRO-3) to CPU memory; auto: none, unless no
    configuration the plan allows fits without it: then the optimizer's, then also the parameters'."""
    activation_checkpointing: Literal["off", "full", "selective", "auto"] = "off"
    """Recompute decoder layers' activations in the backward instead of keeping them (transformers'
    gradient checkpointing, non-reentrant): full, every layer; selective, every
    activation_checkpointing_every-th layer; auto: off unless the stage's estimate does not fit
    without it (then full). Same loss and gradients, about a third more compute."""
    activation_checkpointing_every: int = Field(2, ge=2)
    """selective: checkpoint layers 0, k, 2k, ... (k = this); the others keep their activations."""
    optimizer: OptimizerSpec = OptimizerSpec()
    """The optimizer. A block of another type than the one it overrides (in defaults, or a multistep
    stage's phase) replaces that block instead of merging into it."""
    scheduler: SchedulerSpec = SchedulerSpec()
    """The learning-rate schedule."""
    regularization: RegularizationSpec = RegularizationSpec()
    """L1 and L2 penalties."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient norm clipping; 0 turns it off (DeepSpeed 0.19.8 defaults to 1.0 if unset)."""
    checkpoint_every: int = Field(50, ge=1)
    """Save a DeepSpeed checkpoint every n optimizer steps (the stage's end always saves one, with its handoff)."""
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
    """Evaluate on the held-out data every n steps, and at the stage's last step."""
    eval_batches: int = Field(4, ge=1)
    """Held-out micro batches per evaluation's loss, at most."""
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
    """Log a train row every n steps to metrics.jsonl and W&B (which wandb.log_every thins further);
    eval steps and the last step always log."""
    seed: int = 1234
    """Seeds the model's random init, the held-out split and the order of the samples."""
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
    preference: PreferenceSpec = PreferenceSpec()
    """kind preference only: the loss and its settings (see PreferenceSpec); micro_batch and
    global_batch count pairs there (each pair is two sequences in one forward)."""
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
        if self.offload == "auto" or self.zero_stage == "auto":  # auto tries only the combinations that work
            return self
        if self.offload.optimizer and self.zero_stage == 0:
            raise ValueError("offload.optimizer needs zero_stage >= 1")
        if self.offload.params and self.zero_stage != 3:
            raise ValueError("offload.params needs zero_stage 3")
        return self
