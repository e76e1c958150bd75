"""micro_batch: auto. At the stage's start every rank builds the stage's engine once for a probe
(same model architecture, trainable set, ZeRO stage, optimizer and fast path), runs a few real
steps of full-length rows at growing micro batches, measures each one's peak memory and drops
the engine again. Training then builds its engine afresh with the largest micro batch that
fitted, and accumulation steps that keep the global batch; the probe's steps leave no trace.

Which micro batches are tried (`next_try`): first stage.micro_batch, the largest candidate the
launch side's memory estimate fits (harness/stages/fit.py; the smallest without an estimate), then
the next larger one; from the line through the two largest that fitted, the largest candidate
predicted to fit the budget, then smaller ones while a try does not fit. A try that runs out of
GPU memory ends the probe. On CPU nothing raises before the kernel kills the process, so the
estimate and the prediction are what keep it inside memory.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch

from harness.records import BatchRecord, InvalidRecord, ProbeTry, StageDir
from harness.stages import Stage
from harness.worker.fast import FastPath
from harness.worker.memory import meminfo_bytes, reset_peak, rss_bytes
from harness.worker.objectives import RANK_OBJECTIVES
from harness.worker.strategy import DeepSpeedStrategy, release_memory

BUDGET_SHARE = 0.9
"""A micro batch may peak at this share of the memory free to the rank: the rest is headroom for
the allocator's fragmentation, eval and the handoff."""


def batch_shape(stage: Stage, stage_dir: StageDir, strategy: DeepSpeedStrategy, build_model: Callable[[], torch.nn.Module]) -> BatchRecord:
    """The stage's micro batch and accumulation: the plan's; for micro_batch auto the one recorded
    by an earlier attempt of the stage, else the probe's (written to micro_batch.json). Collective.
    build_model: the stage's model, fitted to its data; the probe adds the fast path's parts."""
    if not stage.micro_batch_candidates:
        return BatchRecord(micro_batch=stage.micro_batch, grad_accum=stage.grad_accum, global_batch=stage.global_batch,
                           world_size=stage.world_size, chosen_by="plan")
    recorded = recorded_choice(stage, stage_dir)
    if recorded is not None:
        return recorded
    record = probe(stage, strategy, build_model)
    if strategy.is_rank0:
        record.write(stage_dir.micro_batch)
        print(f"[harness] stage {stage.index:02d} micro_batch auto: {record.micro_batch} x {record.grad_accum} accumulation x "
              f"{stage.world_size} ranks = {stage.global_batch} ({_tries_text(record)}; budget {record.budget_bytes / 1e9:.2f} GB "
              f"{record.memory} per rank)", flush=True)
    return record


def recorded_choice(stage: Stage, stage_dir: StageDir) -> BatchRecord | None:
    """An earlier attempt's choice, if it still fits the stage (same global batch and world size):
    a resumed stage goes on with the batch layout it began with."""
    try:
        record = BatchRecord.read(stage_dir.micro_batch)
    except InvalidRecord:
        return None
    if (record.global_batch, record.world_size) != (stage.global_batch, stage.world_size) or record.micro_batch not in stage.micro_batch_candidates:
        return None
    return record.model_copy(update={"chosen_by": "recorded"})


def probe(stage: Stage, strategy: DeepSpeedStrategy, build_model: Callable[[], torch.nn.Module]) -> BatchRecord:
    """Try micro batches on a throwaway engine; the largest that fitted on every rank (the
    smallest candidate when none did). Leaves the strategy ready for the chosen batch."""
    started = time.perf_counter()
    candidates = stage.micro_batch_candidates
    cuda = strategy.device.type == "cuda"
    budget = min(strategy.all_gather_object(_budget_bytes(stage, cuda)))
    strategy.set_batch(candidates[-1], 1)
    fast = FastPath(stage, is_rank0=False)  # quiet: the stage itself reports its fast path
    model = build_model()
    fast.prepare_model(model)
    strategy.setup(model)
    fast.compile(strategy.engine)
    tries: list[ProbeTry] = []
    while (micro := next_try(candidates, tries, budget, start=stage.micro_batch)) is not None:
        tries.append(_try(stage, strategy, fast, micro, model.config.vocab_size, budget, cuda))
        if tries[-1].peak_bytes is None:
            break  # out of GPU memory: the engine's buffers may be half written, stop here
    strategy.close()
    del model, fast
    release_memory()
    reset_peak()
    fitted = [t.micro_batch for t in tries if t.fits]
    chosen = max(fitted) if fitted else candidates[0]
    grad_accum = stage.global_batch // (chosen * stage.world_size)
    strategy.set_batch(chosen, grad_accum)
    return BatchRecord(micro_batch=chosen, grad_accum=grad_accum, global_batch=stage.global_batch, world_size=stage.world_size,
                       chosen_by="probe", memory="gpu" if cuda else "host", budget_bytes=budget, probe=tries,
                       probe_seconds=time.perf_counter() - started)


def next_try(candidates: list[int], tries: list[ProbeTry], budget: int, start: int | None = None) -> int | None:
    """The next micro batch to try, or None when the probe is done (see the module's docstring);
    start: the first (default: the smallest candidate)."""
    tried = {t.micro_batch for t in tries}
    fitted = sorted((t.micro_batch, t.peak_bytes) for t in tries if t.fits)
    failed = [t.micro_batch for t in tries if not t.fits]
    ceiling = min(failed, default=candidates[-1] + 1)
    if not tries:
        return candidates[0] if start is None else start
    if not fitted:  # the start did not fit: the next smaller one
        smaller = [m for m in candidates if m < ceiling]
        return smaller[-1] if smaller else None
    if len(fitted) == 1:
        larger = [m for m in candidates if m > fitted[0][0] and m < ceiling]
        return larger[0] if larger else None
    (m1, p1), (m2, p2) = fitted[-2], fitted[-1]
    per_sample = max(0.0, (p2 - p1) / (m2 - m1))
    open_ = [m for m in candidates if m2 < m < ceiling and m not in tried and p2 + per_sample * (m - m2) <= budget]
    return open_[-1] if open_ else None


def _try(stage: Stage, strategy: DeepSpeedStrategy, fast: FastPath, micro: int, vocab: int, budget: int, cuda: bool) -> ProbeTry:
    """One step (forward, backward, optimizer step) at this micro batch on every rank."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_peak()
    ran = True
    try:
        objective = RANK_OBJECTIVES[stage.data.primary]
        strategy.train_micro_step(partial(objective.loss, settings=stage.settings), objective.probe_batch(stage, micro, vocab),
                                  forward_guard=fast.first_forward)
        strategy.optimizer_step()
    except torch.OutOfMemoryError:
        ran = False
        torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated() if cuda else rss_bytes()[0]
    peaks = strategy.all_gather_object(peak if ran else None)
    if any(p is None for p in peaks):
        return ProbeTry(micro_batch=micro, peak_bytes=None, fits=False)
    return ProbeTry(micro_batch=micro, peak_bytes=max(peaks), fits=max(peaks) <= budget)


def _budget_bytes(stage: Stage, cuda: bool) -> int:
    """What one micro batch may peak at on this rank, measured before the probe's engine exists:
    GPU: a share of the device memory free now; CPU: a share of this rank's current RSS plus its
    part of the node's available memory (procs_per_node ranks share it)."""
    if cuda:
        free, _ = torch.cuda.mem_get_info()
        return int(BUDGET_SHARE * (free + torch.cuda.memory_allocated()))
    available = meminfo_bytes("MemAvailable") or 0
    return int(BUDGET_SHARE * (rss_bytes()[1] + available / stage.procs_per_node))


def _tries_text(record: BatchRecord) -> str:
    return "tried " + ", ".join(f"{t.micro_batch}: " + ("out of memory" if t.peak_bytes is None else f"{t.peak_bytes / 1e9:.2f} GB")
                                for t in record.probe)
