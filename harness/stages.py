"""Plan -> ordered list of stages, and which of them share a launch. A stage is one DeepSpeed engine.

A pretrain or finetune phase is one stage; a multistep phase expands into
cycles x stages, named `<phase>.c<k>.s<j>-<name>`. Every stage is fully
resolved here (world size, batch split, precision, steps), so the config
builder and the worker never guess. Pure: no I/O besides the row counter the
caller passes in, no torch.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal

from harness.plan import (
    CPU_UNSUPPORTED_OPTIMIZERS,
    ClusterSpec,
    DataSpec,
    MixSpec,
    ModelSpec,
    MultistepData,
    PhaseSpec,
    Plan,
    PlanError,
    SlurmSpec,
    Strict,
    TrainSettings,
    WandbSpec,
)
from harness import fast, trainable
from harness.fast import FastChoice
from harness.model_params import ParamTable
from harness.trainable import TrainableSet


class StageData(Strict):
    """What a stage trains on: one or both data sets and how batches pick between them."""

    pretrain: DataSpec | None = None
    finetune: DataSpec | None = None
    source: Literal["pretrain", "finetune", "mix"]
    mix: Literal["alternate"] | MixSpec = "alternate"

    @property
    def packs_rows(self) -> bool:
        """Whether it trains on fine-tune rows packed end to end (data.packing)."""
        return self.finetune is not None and self.finetune.packing and self.source != "pretrain"

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
    """What the config builder needs of the model's architecture (from its config.json)."""

    hidden_size: int
    layer_params: int
    """Parameters of one decoder layer (attention + MLP)."""


def model_shape(config: dict[str, Any]) -> ModelShape | None:
    """The shape of a Hugging Face model config (Llama-style names; GPT-2's n_embd/n_inner too);
    None when the config names no hidden size."""
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    if not isinstance(hidden, int):
        return None
    intermediate = config.get("intermediate_size") or config.get("n_inner") or 4 * hidden
    heads = config.get("num_attention_heads") or config.get("n_head") or 1
    kv_width = (config.get("num_key_value_heads") or heads) * (config.get("head_dim") or hidden // heads)
    return ModelShape(hidden_size=hidden, layer_params=2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * intermediate)


class Stage(Strict):
    """One fully resolved relaunch: everything the config builder and the worker need."""

    index: int
    name: str
    phase: str
    kind: Literal["pretrain", "finetune", "multistep"]
    run_name: str
    model: ModelSpec
    cluster: ClusterSpec
    wandb: WandbSpec
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
    micro_batch: int
    """Samples per forward on each rank: the plan's; with micro_batch auto the largest candidate,
    which the worker replaces by the probe's choice (harness/worker/batch_probe.py)."""
    micro_batch_candidates: list[int] = []
    """micro_batch auto: the micro batches the probe may pick, smallest first; [] when the plan sets one."""
    grad_accum: int
    """Accumulation steps for micro_batch (the worker recomputes it for the probe's choice)."""
    global_batch: int
    precision: Literal["fp32", "bf16", "fp16"]
    settings: TrainSettings
    data: StageData
    fast: FastChoice = FastChoice()
    """The fast path's parts this stage turns on (harness/fast.py)."""
    trainable: TrainableSet | None = None
    """The parameters it trains, in optimizer groups (harness/trainable.py); None: every parameter,
    one group at the optimizer's lr (the default, resolved without reading the model)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def optimizer_type(self) -> str:
        return self.settings.optimizer.type


RowCounter = Callable[[DataSpec], int]
ParamLister = Callable[[], ParamTable]


def expand_stages(plan: Plan, accelerator: Literal["cpu", "cuda"], count_train_rows: RowCounter, model_config: dict[str, Any],
                  local_gpus: int | None = None, model_params: ParamLister | None = None) -> list[Stage]:
    """Every stage of the plan, in order (model_config: the model's config.json; local_gpus: the GPUs
    of this machine, which a local launch on cuda must not exceed, None when unknown or irrelevant;
    model_params: the model's parameters, asked for only when a stage's trainable set needs them).
    Raises PlanError naming the field on a rule that needs the resolved numbers (batch split, rows,
    device support, trainable selectors)."""
    stages: list[Stage] = []
    problems: list[tuple[str, Any, str]] = []
    shape = model_shape(model_config)
    count_train_rows = _counted_once(count_train_rows)
    for i, phase in enumerate(plan.phases):
        phase_stages = []
        for name, settings, data, where in _phase_parts(phase):
            try:
                phase_stages.append(_resolve(plan, phase, len(stages) + len(phase_stages), name, settings, data, accelerator, count_train_rows, shape,
                                             local_gpus, model_params))
            except _StageProblem as problem:
                for field, value, allowed in problem.problems:
                    path = field if field.startswith("cluster.") else f"phases[{i}]{where}.{field}"
                    problems.append((path, value, allowed))
        stages += _with_phase_offsets(phase_stages)
    if problems:
        raise PlanError(problems)
    return stages


def _counted_once(count_train_rows: RowCounter) -> RowCounter:
    """The counter, reading each data set once: every stage of a multistep phase asks for the same."""
    counts: dict[str, int] = {}

    def counted(spec: DataSpec) -> int:
        key = spec.model_dump_json()
        if key not in counts:
            counts[key] = count_train_rows(spec)
        return counts[key]

    return counted


def _with_phase_offsets(phase_stages: list[Stage]) -> list[Stage]:
    total = sum(stage.steps for stage in phase_stages)
    offsets = [sum(stage.steps for stage in phase_stages[:k]) for k in range(len(phase_stages))]
    return [stage.model_copy(update={"phase_offset": offset, "phase_steps": total}) for stage, offset in zip(phase_stages, offsets)]


def stage_fields(plan: Plan) -> list[str]:
    """The plan block each stage of expand_stages comes from, in the same order: 'phases[0]', or
    'phases[2].stages[1]' for a multistep stage (once per cycle)."""
    return [f"phases[{i}]{where}" for i, phase in enumerate(plan.phases) for *_, where in _phase_parts(phase)]


def _phase_parts(phase: PhaseSpec):
    """(stage name, settings, data, location in the plan) for each stage of a phase."""
    if not isinstance(phase.data, MultistepData):
        source = "pretrain" if phase.kind == "pretrain" else "finetune"
        yield phase.name, phase.settings(), StageData(source=source, **{source: phase.data}), ""
        return
    for cycle in range(1, phase.cycles + 1):
        for j in range(len(phase.stages)):
            stage = phase.stage_settings(j)  # valid: parse_plan checked every stage
            suffix = stage.name or _optimizer_label(stage)
            data = StageData(pretrain=phase.data.pretrain, finetune=phase.data.finetune, source=stage.data, mix=phase.data.mix)
            settings = TrainSettings.model_validate(stage.model_dump(include=set(TrainSettings.model_fields)))
            yield f"{phase.name}.c{cycle}.s{j + 1}-{suffix}", settings, data, f".stages[{j}]"


def _optimizer_label(settings: TrainSettings) -> str:
    """'adamw', 'sgd', 'sgd-momentum', 'sgd-nesterov': the default name suffix of a multistep stage."""
    optimizer = settings.optimizer
    label = optimizer.type.lower()
    if optimizer.nesterov:
        return f"{label}-nesterov"
    return f"{label}-momentum" if optimizer.momentum else label


class _StageProblem(Exception):
    """Rules a stage breaks, as (field, value, allowed); field is relative to the stage's block of the
    plan, or 'cluster.<name>'."""

    def __init__(self, field: str, value: Any, allowed: str, *more: tuple[str, Any, str]):
        self.problems = [(field, value, allowed), *more]


def _resolve(
    plan: Plan,
    phase: PhaseSpec,
    index: int,
    name: str,
    settings: TrainSettings,
    data: StageData,
    accelerator: Literal["cpu", "cuda"],
    count_train_rows: RowCounter,
    shape: ModelShape | None,
    local_gpus: int | None,
    model_params: ParamLister | None,
) -> Stage:
    nodes = settings.nodes or plan.cluster.nodes
    procs = settings.procs_per_node or plan.cluster.procs_per_node
    # Named where the number comes from: the phase's override or the cluster.
    nodes_field = "nodes" if settings.nodes else "cluster.nodes"
    procs_field = "procs_per_node" if settings.procs_per_node else "cluster.procs_per_node"
    if plan.cluster.launcher == "local" and nodes > 1:
        raise _StageProblem(nodes_field, nodes, "1 with launcher local (this machine only); several nodes need launcher pdsh or slurm")
    if plan.cluster.launcher == "local" and accelerator == "cuda" and local_gpus is not None and procs > local_gpus:
        raise _StageProblem(procs_field, procs, f"at most {local_gpus}, the GPUs `nvidia-smi -L` lists on this machine (a local launch runs one rank per GPU)")
    world = nodes * procs
    candidates = []
    if settings.micro_batch == "auto":  # the plan requires global_batch with it
        if settings.global_batch % world:
            raise _StageProblem("global_batch", settings.global_batch, f"a multiple of the world size ({world}) with micro_batch auto")
        candidates = fast.micro_batch_candidates(settings.global_batch, world)
    micro_batch = candidates[-1] if candidates else settings.micro_batch
    per_step = micro_batch * world
    global_batch = settings.global_batch or per_step
    if global_batch % per_step:
        raise _StageProblem(
            "global_batch",
            global_batch,
            f"a multiple of micro_batch x world size = {micro_batch} x {world} = {per_step}",
        )
    precision = settings.precision
    if precision == "auto":
        precision = "bf16" if accelerator == "cuda" else "fp32"
    if accelerator == "cpu" and precision == "fp16":
        raise _StageProblem("precision", "fp16", "fp32 or bf16 on CPU (fp16 fails on CPU in DeepSpeed 0.19.8)")
    if accelerator == "cpu" and settings.optimizer.type in CPU_UNSUPPORTED_OPTIMIZERS and not settings.offload.optimizer:
        raise _StageProblem("optimizer.type", settings.optimizer.type, "on CPU: Adam, AdamW, Adagrad, SGD, RMSprop (Lamb/Lion fail on CPU in DeepSpeed 0.19.8)")
    train_rows = count_train_rows(data.finetune) if data.finetune is not None and data.finetune.hub is None else None
    if train_rows is not None and data.source != "pretrain" and train_rows < global_batch:
        raise _StageProblem("global_batch", global_batch, f"at most {train_rows}, the training rows of the fine-tune data "
                            "(its rows less the eval hold-out): give more rows or a smaller global_batch")
    steps = _steps(settings, global_batch, data, train_rows)
    trainable_set = None
    if trainable.needs_resolving(settings):
        if model_params is None:
            raise _StageProblem("trainable", settings.trainable.model_dump(), "the default (every parameter) here: no parameter list was given")
        trainable_set, trainable_problems = trainable.resolve(settings, model_params())
        if trainable_problems:
            raise _StageProblem(*trainable_problems[0], *trainable_problems[1:])
    return Stage(
        index=index,
        name=name,
        phase=phase.name,
        kind=phase.kind,
        run_name=plan.name,
        model=plan.model,
        cluster=plan.cluster,
        wandb=plan.wandb,
        slurm=plan.slurm,
        cache_dir=plan.cache_dir,
        model_shape=shape,
        accelerator=accelerator,
        nodes=nodes,
        procs_per_node=procs,
        steps=steps,
        phase_steps=steps,
        micro_batch=micro_batch,
        micro_batch_candidates=candidates,
        grad_accum=global_batch // per_step,
        global_batch=global_batch,
        precision=precision,
        settings=settings,
        data=data,
        fast=fast.resolve(settings, accelerator, precision, packed_rows=data.packs_rows),
        trainable=trainable_set,
    )


def _steps(settings: TrainSettings, global_batch: int, data: StageData, train_rows: int | None) -> int:
    if settings.steps is not None:
        return settings.steps
    if settings.tokens is not None:
        return math.ceil(settings.tokens / (global_batch * settings.seq_len))
    if settings.epochs is not None and data.finetune is not None:
        if train_rows is None:
            raise _StageProblem("epochs", settings.epochs, "steps or tokens for hub data (rows are counted from local files)")
        return max(1, math.ceil(settings.epochs * train_rows / global_batch))
    raise _StageProblem("steps", None, "one of steps, epochs, tokens")


def eval_size(n_rows: int, spec: DataSpec) -> int:
    """How many of n_rows samples are held out for evaluation (the worker uses the same rule)."""
    return min(spec.eval_max_samples, max(1, int(n_rows * spec.eval_fraction)))


def launch_groups(stages: list[Stage], todo: set[int]) -> list[list[Stage]]:
    """The launches that run the stages numbered in `todo`, in run order. With cluster.transitions
    `swap`, consecutive stages on the same nodes and ranks per node share one launch (the ranks
    swap the engine in place); a topology change, a stage not to run, or `relaunch` starts a new one."""
    groups: list[list[Stage]] = []
    previous: Stage | None = None
    for stage in stages:
        if stage.index not in todo:
            previous = None
            continue
        joins = (previous is not None and stage.cluster.transitions == "swap"
                 and (stage.nodes, stage.procs_per_node) == (previous.nodes, previous.procs_per_node))
        if joins:
            groups[-1].append(stage)
        else:
            groups.append([stage])
        previous = stage
    return groups
