"""A stage: one DeepSpeed engine's worth of training, fully resolved on the launch side (world size,
batch split, precision, steps, what trains, the fast path, the W&B mode), so the config builder
and the worker never guess; and stage.json, what a rank reads to run it. Pure, no torch.
"""
from __future__ import annotations

import math
from typing import Any, Literal

from harness.objectives import OBJECTIVES
from harness.plan import BYTE_VOCAB, ClusterSpec, DataSpec, MixSpec, ModelSpec, OffloadSpec, SlurmSpec, Strict, TrainSettings, WandbSpec
from harness.records import EmbeddingResize, EngineIdentity, Record, ResumePoint, StartDecision
from harness.records.memory import MemoryPlan
from harness.stages.fast import FastChoice
from harness.stages.mixture import MixPlan, mix_plan
from harness.stages.trainable import TrainableSet


class StageData(Strict):
    """What a stage trains on: one data set per objective it trains, and how batches pick between
    them (a multistep stage alternates or mixes its pretrain and finetune sets)."""

    sets: dict[str, DataSpec] = {}
    """The data set of each objective kind the stage trains (harness/objectives)."""
    source: str
    """The objective kind every step draws from, or 'mix' (multistep: `mix` decides per step)."""
    mix: Literal["alternate"] | MixSpec = "alternate"
    mixes: dict[str, MixPlan] = {}
    """The sets that are weighted mixtures (data.sources): how their sources are drawn (harness/stages/mixture.py)."""

    @classmethod
    def of(cls, sets: dict[str, DataSpec], source: str, mix: Literal["alternate"] | MixSpec = "alternate") -> StageData:
        """The stage data of these sets, with the mix of each that is a mixture."""
        return cls(sets=sets, source=source, mix=mix, mixes={kind: plan for kind, spec in sets.items() if (plan := mix_plan(spec))})

    @property
    def packs_rows(self) -> bool:
        """Whether the sets a step draws from lay their rows end to end (data.packing)."""
        return any(OBJECTIVES[kind].packs_rows(spec) for kind, spec in self.sets.items() if self.source in (kind, "mix"))

    @property
    def primary(self) -> str:
        """The data set whose held-out rows the stage's eval/loss reports: the one it trains on, or
        the first of a mix."""
        return self.source if self.source != "mix" else next(iter(self.sets))

    def source_at(self, step: int) -> str:
        """Data set of optimizer step `step` (1-based): the same on every rank."""
        if self.source != "mix":
            return self.source
        if self.mix == "alternate":
            return "pretrain" if step % 2 == 1 else "finetune"
        # Exact ratio without randomness: step s is pretrain when floor(s*p) grows.
        p = self.mix.pretrain
        return "pretrain" if math.floor(step * p) > math.floor((step - 1) * p) else "finetune"


class ModelShape(Strict):
    """What the config builder and the memory estimate need of the model's architecture (from its config.json)."""

    hidden_size: int
    layer_params: int
    """Parameters of one decoder layer (attention + MLP)."""
    num_layers: int
    num_heads: int
    kv_width: int
    """Width of the keys (and of the values): key-value heads x head size."""
    intermediate_size: int
    vocab_size: int
    params: int
    """Every parameter: embeddings, decoder layers with their norms, the final norm, the output head unless tied."""


def model_shape(config: dict[str, Any]) -> ModelShape | None:
    """The shape of a Hugging Face model config (Llama-style names; GPT-2's n_embd/n_inner too);
    None when the config names no hidden size. A config without vocab_size is a built-in's, sized to
    the byte tokenizer unless the launch side added the tokenizer's size."""
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    if not isinstance(hidden, int):
        return None
    intermediate = config.get("intermediate_size") or config.get("n_inner") or 4 * hidden
    heads = config.get("num_attention_heads") or config.get("n_head") or 1
    kv_width = (config.get("num_key_value_heads") or heads) * (config.get("head_dim") or hidden // heads)
    layer_params = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * intermediate
    layers = config.get("num_hidden_layers") or config.get("n_layer") or 1
    vocab = config.get("vocab_size") or BYTE_VOCAB
    tied = config.get("tie_word_embeddings", "n_embd" in config)  # GPT-2 configs leave it to the default, True
    params = vocab * hidden * (1 if tied else 2) + layers * (layer_params + 2 * hidden) + hidden
    return ModelShape(hidden_size=hidden, layer_params=layer_params, num_layers=layers, num_heads=heads, kv_width=kv_width,
                      intermediate_size=intermediate, vocab_size=vocab, params=params)


class Stage(Strict):
    """One fully resolved stage: everything the config builder and the worker need."""

    index: int
    name: str
    phase: str
    kind: str
    """The phase kind: an objective (harness/objectives), or multistep."""
    run_name: str
    model: ModelSpec
    cluster: ClusterSpec
    wandb: WandbSpec
    wandb_mode: Literal["online", "offline", "disabled"]
    """wandb.mode as resolved on the launch side (auto: WANDB_MODE, else online with an API key, else offline)."""
    slurm: SlurmSpec
    cache_dir: str
    """Where the token stores live (the plan's cache_dir, resolved)."""
    model_shape: ModelShape | None
    """None: the model's config names no hidden size (DeepSpeed's own buffer defaults then)."""
    accelerator: Literal["cpu", "cuda"]
    nodes: int
    procs_per_node: int
    steps: int
    phase_offset: int = 0
    """Steps of this phase run before this stage (multistep), for schedules that span the phase."""
    phase_steps: int
    """Steps of the whole phase."""
    steps_after: int = 0
    """Steps of the plan's stages after this one: with this stage's step time, the plan's ETA."""
    micro_batch: int
    """Samples per forward on each rank: the plan's; with micro_batch auto the largest candidate,
    which the worker replaces by the probe's choice (harness/worker/batch_probe.py)."""
    micro_batch_candidates: list[int] = []
    """micro_batch auto: the micro batches the probe may pick, smallest first; [] when the plan sets one."""
    grad_accum: int
    """Accumulation steps for micro_batch (the worker recomputes it for the probe's choice)."""
    global_batch: int
    precision: Literal["fp32", "bf16", "fp16"]
    handoff_dtype: Literal["fp32", "bf16"]
    """dtype of the handoff's weight files: the plan's, auto meaning bf16 on GPU, else fp32."""
    settings: TrainSettings
    data: StageData
    fast: FastChoice = FastChoice()
    """The fast path's parts this stage turns on (harness/stages/fast.py)."""
    trainable: TrainableSet | None = None
    """The parameters it trains, in optimizer groups (harness/stages/trainable.py); None: every
    parameter, one group at the optimizer's lr (the default, resolved without reading the model)."""
    zero_stage: int
    """The ZeRO stage it runs: the plan's, or what zero_stage auto chose (memory.decisions says why).
    Read this, never settings.zero_stage, which may be 'auto'."""
    offload: OffloadSpec
    """The offload it runs: the plan's, or what offload auto chose. Read this, not settings.offload."""
    activation_checkpointing: Literal["off", "full", "selective"] = "off"
    """Decoder layers recomputed in the backward: none, all, or every settings.activation_checkpointing_every-th
    (the plan's, or what activation_checkpointing auto chose)."""
    memory: MemoryPlan | None = None
    """The per-rank memory estimate of this configuration, the memory a rank has, and the choices the
    estimate made (harness/stages/fit.py); None when the model's config gives no shape to estimate from."""
    embedding_resize: EmbeddingResize | None = None
    """The embedding rows this stage adds before training (the first stage, with model.resize_embeddings
    and a tokenizer longer than the model's embeddings: harness/stages/model_fit.py)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def optimizer_type(self) -> str:
        return self.settings.optimizer.type

    @property
    def recompute_every(self) -> int:
        """activation_checkpointing as a layer stride: every k-th decoder layer is recomputed (1:
        full), 0: none."""
        return {"off": 0, "full": 1, "selective": self.settings.activation_checkpointing_every}[self.activation_checkpointing]


def engine_identity(stage: Stage) -> EngineIdentity:
    """The engine a stage trains with, as its checkpoints and manifest record it."""
    chosen = stage.trainable
    return EngineIdentity(optimizer=stage.optimizer_type, zero_stage=stage.zero_stage, world_size=stage.world_size, dtype=stage.precision,
                          offload=stage.offload, model=stage.model, trained=chosen.trained() if chosen else "all",
                          layout=chosen.layout() if chosen else "all", trainable_params=chosen.trainable_params if chosen and chosen.frozen else None,
                          adapter=chosen.adapter if chosen else None)


class StageFile(Record):
    """stage.json: everything a rank needs to run its stage."""

    stage: Stage
    previous: str | None
    """The previous stage's folder (its manifest and handoff), None for the first stage."""
    run_dir: str
    start: StartDecision
    resume: ResumePoint = ResumePoint(mode="fresh", reason="no checkpoint of its own")
