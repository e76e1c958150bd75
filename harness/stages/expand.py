"""Plan -> the ordered list of its stages. A pretrain or finetune phase is one stage; a multistep
phase expands into cycles x stages, named `<phase>.c<k>.s<j>-<name>`. Every rule that needs the
resolved numbers (batch split, rows, device support, trainable selectors) is checked here and
reported as a PlanError naming the field. Pure: no I/O besides the row counter and parameter
lister the caller passes in, no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

from harness.objectives import OBJECTIVES
from harness.plan import CPU_UNSUPPORTED_OPTIMIZERS, DataSpec, MultistepData, PhaseSpec, Plan, PlanError, Problem, TrainSettings
from harness.records import Adapter
from harness.stages import fast, fit, trainable
from harness.stages.adapter import resolve_adapter
from harness.stages.params import ParamTable
from harness.stages.stage import ModelShape, Stage, StageData, model_shape

RowCounter = Callable[[DataSpec], int]
ParamLister = Callable[[Adapter | None], ParamTable]
"""The model's parameter table, or that of the model with an adapter applied."""


@dataclass(frozen=True)
class Resolving:
    """What every stage of a plan is resolved against, besides the plan: found on the launch side."""

    accelerator: Literal["cpu", "cuda"]
    wandb_mode: Literal["online", "offline", "disabled"]
    count_train_rows: RowCounter
    shape: ModelShape | None
    local_gpus: int | None
    model_params: ParamLister | None
    machine: fit.MachineMemory | None


def expand_stages(plan: Plan, accelerator: Literal["cpu", "cuda"], count_train_rows: RowCounter, model_config: dict[str, Any],
                  local_gpus: int | None = None, model_params: ParamLister | None = None, *,
                  wandb_mode: Literal["online", "offline", "disabled"], machine: fit.MachineMemory | None = None) -> list[Stage]:
    """Every stage of the plan, in order (model_config: the model's config.json; local_gpus: the GPUs
    of this machine, which a local launch on cuda must not exceed, None when unknown or irrelevant;
    model_params: the model's parameters (with an adapter applied, when given one), asked for only
    when a stage's trainable set needs them;
    wandb_mode: the plan's W&B mode as resolved on the launch side, harness/launch/wandb_mode.py;
    machine: the memory of the machine that runs harness plan, harness/launch/hosts.py, None when
    unknown). Raises PlanError naming the field on a rule that needs the resolved numbers (batch
    split, rows, device support, trainable selectors, memory: harness/stages/fit.py)."""
    stages: list[Stage] = []
    problems: list[Problem] = []
    context = Resolving(accelerator, wandb_mode, _counted_once(count_train_rows), model_shape(model_config), local_gpus, model_params, machine)
    for i, phase in enumerate(plan.phases):
        phase_stages = []
        for name, settings, data, where in _phase_parts(phase):
            try:
                phase_stages.append(_resolve(plan, phase, len(stages) + len(phase_stages), name, settings, data, context))
            except _StageProblem as problem:
                for field, value, allowed in problem.problems:
                    path = field if field.startswith("cluster.") else f"phases[{i}]{where}.{field}"
                    problems.append((path, value, allowed))
        stages += _with_phase_offsets(phase_stages)
    if problems:
        raise PlanError(problems)
    later = [sum(stage.steps for stage in stages[k + 1:]) for k in range(len(stages))]
    return [stage.model_copy(update={"steps_after": steps_after}) for stage, steps_after in zip(stages, later)]


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
        yield phase.name, phase.settings(), StageData.of({phase.kind: phase.data}, phase.kind), ""
        return
    for cycle in range(1, phase.cycles + 1):
        for j in range(len(phase.stages)):
            stage = phase.stage_settings(j)  # valid: parse_plan checked every stage
            suffix = stage.name or _optimizer_label(stage)
            data = StageData.of({"pretrain": phase.data.pretrain, "finetune": phase.data.finetune}, stage.data, phase.data.mix)
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

    def __init__(self, field: str, value: Any, allowed: str, *more: Problem):
        self.problems = [(field, value, allowed), *more]


def _resolve(plan: Plan, phase: PhaseSpec, index: int, name: str, settings: TrainSettings, data: StageData, context: Resolving) -> Stage:
    accelerator, local_gpus = context.accelerator, context.local_gpus
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
    micro_batch = candidates[-1] if candidates else settings.micro_batch  # the largest: every candidate divides the global batch
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
    if accelerator == "cpu" and settings.optimizer.type in CPU_UNSUPPORTED_OPTIMIZERS and (settings.offload == "auto" or not settings.offload.optimizer):
        raise _StageProblem("optimizer.type", settings.optimizer.type, "on CPU: Adam, AdamW, Adagrad, SGD, RMSprop (Lamb/Lion fail on CPU in DeepSpeed 0.19.8)")
    rows_kind, row_spec = _row_set(data)
    local = row_spec is not None and all(one.hub is None for one, _ in row_spec.weighted_sets())
    train_rows = context.count_train_rows(row_spec) if local else None
    if train_rows is not None and data.source in (rows_kind, "mix") and train_rows < global_batch:
        raise _StageProblem("global_batch", global_batch, f"at most {train_rows}, the training rows of the {OBJECTIVES[rows_kind].label} data "
                            "(its rows less the eval hold-out): give more rows or a smaller global_batch")
    steps = _steps(settings, global_batch, row_spec, train_rows)
    trainable_set = None
    if trainable.needs_resolving(settings):
        if context.model_params is None:
            raise _StageProblem("trainable", settings.trainable.model_dump(), "the default (every parameter) here: no parameter list was given")
        table, adapter = context.model_params(None), None
        if settings.trainable.adapter is not None:
            adapter, adapter_problems = resolve_adapter(settings.trainable.adapter, table, accelerator)
            if adapter_problems:
                raise _StageProblem(*adapter_problems[0], *adapter_problems[1:])
            table = context.model_params(adapter)
        trainable_set, trainable_problems = trainable.resolve(settings, table, adapter)
        if trainable_problems:
            raise _StageProblem(*trainable_problems[0], *trainable_problems[1:])
    # The memory settings (harness/stages/fit.py): the plan's, or for an `auto` the first allowed, settled below.
    first = fit.allowed(settings, candidates[0] if candidates else micro_batch)[0]
    stage = Stage(
        index=index,
        name=name,
        phase=phase.name,
        kind=phase.kind,
        run_name=plan.name,
        model=plan.model,
        cluster=plan.cluster,
        wandb=plan.wandb,
        wandb_mode=context.wandb_mode,
        slurm=plan.slurm,
        cache_dir=plan.cache_dir,
        model_shape=context.shape,
        accelerator=accelerator,
        nodes=nodes,
        procs_per_node=procs,
        steps=steps,
        phase_steps=steps,
        micro_batch=first.micro_batch,
        micro_batch_candidates=candidates,
        grad_accum=global_batch // (first.micro_batch * world),
        global_batch=global_batch,
        precision=precision,
        handoff_dtype=settings.handoff_dtype if settings.handoff_dtype != "auto" else ("bf16" if accelerator == "cuda" else "fp32"),
        settings=settings,
        data=data,
        fast=fast.resolve(settings, accelerator, precision, packed_rows=data.packs_rows, zero_stage=first.zero_stage),
        trainable=trainable_set,
        zero_stage=first.zero_stage,
        offload=first.offload,
        activation_checkpointing=first.checkpointing,
    )
    stage, memory_problems = fit.settle(stage, fit.rank_memory(plan.cluster, accelerator, procs, context.machine))
    if memory_problems:
        raise _StageProblem(*memory_problems[0], *memory_problems[1:])
    return stage


def _row_set(data: StageData) -> tuple[str | None, DataSpec | None]:
    """(kind, data set) of the stage's data set whose samples are rows (fine-tune rows, not packed
    blocks): epochs count them, and a global batch needs that many; (None, None) without one."""
    kind = next((kind for kind in data.sets if OBJECTIVES[kind].samples_are_rows), None)
    return kind, data.sets.get(kind)


def _steps(settings: TrainSettings, global_batch: int, row_spec: DataSpec | None, train_rows: int | None) -> int:
    if settings.steps is not None:
        return settings.steps
    if settings.tokens is not None:
        return math.ceil(settings.tokens / (global_batch * settings.seq_len))
    if settings.epochs is not None and row_spec is not None:
        if train_rows is None:
            raise _StageProblem("epochs", settings.epochs, "steps or tokens for hub data (rows are counted from local files)")
        return max(1, math.ceil(settings.epochs * train_rows / global_batch))
    raise _StageProblem("steps", None, "one of steps, epochs, tokens")


def eval_size(n_rows: int, spec: DataSpec) -> int:
    """How many of n_rows samples are held out for evaluation (the worker uses the same rule)."""
    return min(spec.eval_max_samples, max(1, int(n_rows * spec.eval_fraction)))
