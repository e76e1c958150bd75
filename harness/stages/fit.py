"""Whether a stage fits, and the settings the plan leaves to memory: decided on the launch side from the
per-rank estimate (harness/stages/memory.py) against the memory a rank has (records.RankMemory:
found by harness/launch/hosts.py, or cluster.rank_memory_gb), shown by `harness plan`, recorded in
stage.json and the manifest, carried out by the worker. Pure, no torch.

A configuration fits when its estimate, plus MARGIN, is within the rank's memory (and, with offload
on cuda, the offloaded part within its host memory). Each `auto` takes the first configuration that
fits, in this order of preference: no offload before offload (the optimizer's, then also the
parameters'), no checkpointing before full checkpointing, then the lowest ZeRO stage (lower stages
communicate less). So activation_checkpointing auto stays off while any allowed ZeRO stage fits
without it, and offload auto stays off while anything fits without it. micro_batch auto decides with
its smallest candidate, then starts its probe (harness/worker/batch_probe.py) at the largest
candidate that fits. A stage that fits in no configuration the plan allows is a plan problem with
the estimate's breakdown and the nearest changes that would fit.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Literal

from harness.plan import ClusterSpec, OffloadSpec, Problem, TrainSettings
from harness.records.memory import MemoryDecision, MemoryEstimate, MemoryPlan, RankMemory, gb
from harness.stages import fast
from harness.stages.ds_config import get_train_ds_config
from harness.stages.memory import estimate
from harness.stages.stage import Stage

MARGIN = 0.10
"""Headroom an estimate must leave: the estimate is calibrated to +-20% on CPU (bench/RESULTS.md)."""
OFFLOADS = [OffloadSpec(), OffloadSpec(optimizer=True), OffloadSpec(optimizer=True, params=True)]
MORE_NODES = 8
"""More ranks: up to this many times the stage's nodes are tried for the refusal's suggestions."""


@dataclass(frozen=True)
class MachineMemory:
    """What the machine that runs `harness plan` has (harness/launch/hosts.py): the smallest GPU's
    memory (None: no nvidia-smi), and the host's MemTotal (None: unknown)."""

    gpu_bytes: int | None
    host_bytes: int | None


def rank_memory(cluster: ClusterSpec, accelerator: Literal["cpu", "cuda"], procs_per_node: int, machine: MachineMemory | None) -> RankMemory | None:
    """The memory one rank has: cluster.rank_memory_gb if set, else the machine's (GPU: one per rank;
    host: shared by the ranks of a node); None when unknown."""
    host = machine.host_bytes // procs_per_node if machine and machine.host_bytes else None
    host_source = f"MemTotal {gb(machine.host_bytes)} GB / {procs_per_node} rank(s) per node" if host else ""
    if cluster.rank_memory_gb is not None:
        given = int(cluster.rank_memory_gb * 1e9)
        return RankMemory(device="gpu" if accelerator == "cuda" else "host", device_bytes=given,
                          host_bytes=host if accelerator == "cuda" else given, source=f"cluster.rank_memory_gb {cluster.rank_memory_gb:g}")
    if accelerator == "cuda":
        if machine is None or machine.gpu_bytes is None:
            return None
        return RankMemory(device="gpu", device_bytes=machine.gpu_bytes, host_bytes=host,
                          source=f"nvidia-smi {gb(machine.gpu_bytes)} GB per GPU" + (f"; host {host_source}" if host else ""))
    return RankMemory(device="host", device_bytes=host, host_bytes=host, source=host_source) if host else None


@dataclass(frozen=True)
class Choice:
    """One configuration of a stage's memory settings."""

    zero_stage: int
    offload: OffloadSpec
    checkpointing: str
    micro_batch: int


def with_choice(stage: Stage, choice: Choice) -> Stage:
    """The stage with these memory settings; its batch split and fast path follow them."""
    return stage.model_copy(update={
        "zero_stage": choice.zero_stage, "offload": choice.offload, "activation_checkpointing": choice.checkpointing,
        "micro_batch": choice.micro_batch, "grad_accum": stage.global_batch // (choice.micro_batch * stage.world_size),
        "fast": fast.resolve(stage.settings, stage.accelerator, stage.precision, packed_rows=stage.data.packs_rows, zero_stage=choice.zero_stage)})


def fits(found: MemoryEstimate, memory: RankMemory) -> bool:
    """The estimate with MARGIN is within the rank's memory (and its offloaded part within the host's)."""
    if found.total_bytes * (1 + MARGIN) > memory.device_bytes:
        return False
    return not found.host or memory.host_bytes is None or found.host_bytes * (1 + MARGIN) <= memory.host_bytes


def estimate_of(stage: Stage) -> MemoryEstimate:
    return estimate(stage, get_train_ds_config(stage))


@dataclass(frozen=True)
class Tried:
    """A configuration, its stage and its estimate."""

    choice: Choice
    stage: Stage
    estimate: MemoryEstimate


def settle(stage: Stage, memory: RankMemory | None) -> tuple[Stage, list[Problem]]:
    """The stage with its `auto` memory settings decided and its MemoryPlan attached, and the problems:
    an auto that cannot be decided, or a stage that fits in no configuration the plan allows.
    `stage` comes with the first allowed configuration (harness/stages/expand.py)."""
    settings, micro_candidates = stage.settings, stage.micro_batch_candidates
    choices = allowed(settings, stage.micro_batch)
    autos = [field for field in ("zero_stage", "offload", "activation_checkpointing") if getattr(settings, field) == "auto"]
    if stage.model_shape is None:  # no shape, no estimate: the plan's values, autos refused
        return stage, [(field, "auto", "a fixed value: the model's config names no hidden size to estimate memory from") for field in autos]
    if memory is None:
        problems = [(field, "auto", "a fixed value, or cluster.rank_memory_gb: the memory of a rank is unknown here "
                     "(no nvidia-smi on this machine)") for field in autos]
        return _with_plan(stage, estimate_of(stage), None, []), problems
    tried: list[Tried] = []
    for choice in choices:
        candidate = with_choice(stage, choice)
        tried.append(Tried(choice, candidate, estimate_of(candidate)))
        if fits(tried[-1].estimate, memory):
            break
    else:
        return stage, [refusal(settings, tried, memory, bool(micro_candidates))]
    decisions = [_decision(field, tried, memory, bool(micro_candidates)) for field in autos]
    found = tried[-1]
    if micro_candidates:
        found, decision = _largest_micro_batch(found, memory, micro_candidates)
        decisions.append(decision)
    return _with_plan(found.stage, found.estimate, memory, decisions), []


def allowed(settings: TrainSettings, micro: int) -> list[Choice]:
    """Every configuration the plan allows, most preferred first (see the module docstring)."""
    zeros = [0, 1, 2, 3] if settings.zero_stage == "auto" else [settings.zero_stage]
    offloads = OFFLOADS if settings.offload == "auto" else [settings.offload]
    checkpointing = ["off", "full"] if settings.activation_checkpointing == "auto" else [settings.activation_checkpointing]
    return [Choice(zero, offload, ckpt, micro) for offload, ckpt, zero in itertools.product(offloads, checkpointing, zeros)
            if not (offload.optimizer and zero == 0) and not (offload.params and zero != 3)]


def _with_plan(stage: Stage, found: MemoryEstimate, memory: RankMemory | None, decisions: list[MemoryDecision]) -> Stage:
    return stage.model_copy(update={"memory": MemoryPlan(estimate=found, rank_memory=memory, decisions=decisions)})


def _label(stage: Stage) -> str:
    """'ZeRO-2, offload optimizer, checkpointing full'."""
    parts = [f"ZeRO-{stage.zero_stage}"]
    if stage.offload.optimizer or stage.offload.params:
        parts.append(f"offload {_offload_text(stage.offload)}")
    if stage.activation_checkpointing != "off":
        parts.append(f"checkpointing {stage.activation_checkpointing}")
    return ", ".join(parts)


def _offload_text(offload: OffloadSpec) -> str:
    return " + ".join(part for part, on in (("optimizer", offload.optimizer), ("params", offload.params)) if on) or "none"


def _decision(field: str, tried: list[Tried], memory: RankMemory, micro_auto: bool) -> MemoryDecision:
    """Why an auto field took its value: the estimates of the configurations tried before the one that fits."""
    found = tried[-1]
    value = {"zero_stage": str(found.stage.zero_stage), "offload": _offload_text(found.stage.offload),
             "activation_checkpointing": found.stage.activation_checkpointing}[field]
    before = "; ".join(f"{_label(t.stage)} {gb(t.estimate.total_bytes)}" for t in tried[:-1])
    at = f" at micro_batch {found.choice.micro_batch} (micro_batch auto's smallest)" if micro_auto else ""
    reason = (f"{_label(found.stage)}: {gb(found.estimate.total_bytes)} GB per rank{at} fits {gb(memory.device_bytes)} GB with a "
              f"{MARGIN:.0%} margin" + (f", the first that does (before it, GB: {before})" if before else ", the first configuration tried"))
    return MemoryDecision(field=field, value=value, reason=reason)


def _largest_micro_batch(found: Tried, memory: RankMemory, candidates: list[int]) -> tuple[Tried, MemoryDecision]:
    """micro_batch auto: the largest candidate whose estimate fits, where the probe starts."""
    for micro in reversed(candidates[1:]):
        choice = Choice(found.choice.zero_stage, found.choice.offload, found.choice.checkpointing, micro)
        stage = with_choice(found.stage, choice)
        bigger = Tried(choice, stage, estimate_of(stage))
        if fits(bigger.estimate, memory):
            found = bigger
            break
    reason = (f"the probe starts at {found.choice.micro_batch}, the largest of {', '.join(map(str, candidates))} whose estimate "
              f"({gb(found.estimate.total_bytes)} GB) fits {gb(memory.device_bytes)} GB with a {MARGIN:.0%} margin")
    return found, MemoryDecision(field="micro_batch", value=str(found.choice.micro_batch), reason=reason)


def refusal(settings: TrainSettings, tried: list[Tried], memory: RankMemory, micro_auto: bool) -> Problem:
    """The problem of a stage that fits in no allowed configuration: the breakdown of the one that needs
    the least, and each single change to the plan that would make it fit."""
    least = min(tried, key=lambda t: t.estimate.total_bytes)
    changes = nearest_changes(settings, least.stage, memory, micro_auto)
    options = "; ".join(changes) if changes else "no single change: several together, or a machine with more memory"
    allowed_text = (f"at most {gb(memory.device_bytes)} GB per rank ({memory.source}) with a {MARGIN:.0%} margin. "
                    f"The estimate ({_label(least.stage)}): {least.estimate.breakdown()}. Changes that would fit: {options}")
    return "memory", f"{gb(least.estimate.total_bytes)} GB per rank", allowed_text


def nearest_changes(settings: TrainSettings, stage: Stage, memory: RankMemory, micro_auto: bool) -> list[str]:
    """Each single change to the plan that makes `stage` (its least-memory allowed configuration) fit,
    with its estimate: a higher ZeRO stage, full checkpointing, offload, a smaller micro batch with
    more accumulation, more nodes. (Adapters, once the harness has them, go here too.)"""
    def first_fit(updates: list[dict], text: Callable[[dict], str]) -> list[str]:
        for update in updates:
            found = estimate_of(stage.model_copy(update=update))
            if fits(found, memory):
                return [f"{text(update)} ({gb(found.total_bytes)} GB)"]
        return []

    changes = []
    if settings.zero_stage != "auto":
        changes += first_fit([{"zero_stage": z} for z in range(stage.zero_stage + 1, 4) if not stage.offload.params],
                             lambda u: f"zero_stage: {u['zero_stage']}")
    if stage.activation_checkpointing != "full":
        changes += first_fit([{"activation_checkpointing": "full"}], lambda u: "activation_checkpointing: full")
    if settings.offload != "auto":
        changes += first_fit([{"offload": o} for o in OFFLOADS[1:] if o != stage.offload and not (o.params and stage.zero_stage != 3)],
                             lambda u: f"offload: {_offload_text(u['offload'])}")
    if not micro_auto:
        share = stage.micro_batch * stage.grad_accum
        changes += first_fit([{"micro_batch": m, "grad_accum": share // m} for m in range(stage.micro_batch - 1, 0, -1) if share % m == 0],
                             lambda u: f"micro_batch: {u['micro_batch']} ({u['grad_accum']} accumulation steps, global_batch {stage.global_batch} kept)")
    changes += first_fit([{"nodes": n} for n in range(stage.nodes + 1, MORE_NODES * stage.nodes + 1)],
                         lambda u: f"nodes: {u['nodes']} (world size {u['nodes'] * stage.procs_per_node}, launcher pdsh or slurm)")
    return changes
