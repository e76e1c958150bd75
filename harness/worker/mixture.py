"""A weighted mixture on the rank side: its sources' sets opened one by one (each its own store,
held-out split and epoch order) and drawn as one set, in the interleave harness/stages/mixture.py
decides. A sample of the mixture is numbered offset_k + its number in source k, so one micro
batch can hold samples of several sources. What each source gave is recorded in the manifest.
"""
from __future__ import annotations

import numpy as np

from harness.objectives import OBJECTIVES
from harness.plan import DataSpec
from harness.records import Progress
from harness.records.manifest import SourceDraw
from harness.records.token_store import StoreRequest
from harness.stages import Stage
from harness.stages.mixture import MixPlan, Mixture
from harness.worker.data import LaysOutSamples, Samples, TokenizedSet, TokenStore, dataset_key, open_set


class MixedSamples:
    """The samples of several sources, source k's numbered from offsets[k]. Counts the tokens each
    source gives the training batches (drawn), for the stage's metrics."""

    def __init__(self, parts: list[Samples]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [part.count for part in parts])
        self.count = int(self.offsets[-1])
        self.drawn = np.zeros(len(parts), dtype=np.int64)

    def _by_source(self, indices: np.ndarray, layout: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The layout of these samples, each from its source, and the real tokens each source gave."""
        indices = np.asarray(indices, dtype=np.int64)
        sources = np.searchsorted(self.offsets, indices, side="right") - 1
        taken = [(k, np.flatnonzero(sources == k), getattr(self.parts[k], layout)(indices[sources == k] - self.offsets[k]))
                 for k in np.unique(sources)]
        tokens = np.zeros(len(self.parts), dtype=np.int64)
        for k, _, arrays in taken:
            mask = arrays.get("attention_mask")  # as token_count: padding does not count
            tokens[k] = int(mask.sum()) if mask is not None else arrays["input_ids"].size
        if len(taken) == 1:
            return taken[0][2], tokens
        at = np.concatenate([where for _, where, _ in taken])
        merged = {}
        for key in taken[0][2]:
            values = [arrays[key] for _, _, arrays in taken]
            if all(len(v) == len(w) and v.shape[1:] == values[0].shape[1:] for v, (_, w, _) in zip(values, taken)):
                merged[key] = np.concatenate(values)[np.argsort(at, kind="stable")]  # a row per sample: in the order asked
            else:  # packed rows, one sequence per batch (shape 1 x tokens): end to end, source by source
                merged[key] = np.concatenate(values, axis=-1)
        return merged, tokens

    def arrays(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        merged, tokens = self._by_source(indices, "arrays")
        self.drawn += tokens
        return merged

    def eval_arrays(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return self._by_source(indices, "eval_arrays")[0]

    def take_drawn(self) -> list[int]:
        """Tokens each source gave this rank's training batches since the last call."""
        drawn, self.drawn = self.drawn.tolist(), np.zeros_like(self.drawn)
        return drawn

    def pair(self, index: int) -> tuple[list[int], list[int]]:
        """Fine-tune generation: (prompt ids, response ids) of a held-out row."""
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.parts[k].pair(int(index - self.offsets[k]))


class MixedOrder:
    """Which sample each position of the mixture's stream draws: the interleave picks the source and
    its position in that source's stream, the source's own order the sample."""

    def __init__(self, parts: list[TokenizedSet], plan: MixPlan, offsets: np.ndarray):
        self.parts, self.plan, self.offsets = parts, plan, offsets
        self.mixture = Mixture(plan)
        self.n_train = sum(part.n_train for part in parts)

    def at(self, positions: np.ndarray) -> np.ndarray:
        sources, within = self.mixture.split(positions)
        out = np.empty(len(sources), dtype=np.int64)
        for k in np.unique(sources):
            chosen = sources == k
            out[chosen] = self.parts[k].order.at(within[chosen]) + self.offsets[k]
        return out

    def exhausted_by(self, end: int) -> str | None:
        """With data.exhausted stop: the source (its inputs) that would start a second epoch before
        position `end`; None when none would, or with repeat."""
        if self.plan.exhausted != "stop":
            return None
        drawn = self.mixture.drawn(end)
        over = [k for k, part in enumerate(self.parts) if drawn[k] > part.n_train]
        return f"source {over[0]} ({self.parts[over[0]].key})" if over else None


def open_mixture(kind: str, spec: DataSpec, requests: list[StoreRequest], plan: MixPlan, objective: LaysOutSamples, seq_len: int,
                 seed: int, pad_id: int) -> TokenizedSet:
    """A mixture's sources as one set (spec: the mixture's data block, for its stream key). The
    held-out samples take turns by source, so every source is in the first eval batches."""
    parts = [open_set(request, objective, seq_len, seed, pad_id, stream=k) for k, request in enumerate(requests)]
    samples = MixedSamples([part.samples for part in parts])
    held_out = [part.eval_indices + samples.offsets[k] for k, part in enumerate(parts)]
    turns = sorted(((j, k) for k, indices in enumerate(held_out) for j in range(len(indices))))
    eval_indices = np.array([held_out[k][j] for j, k in turns], dtype=np.int64)
    order = MixedOrder(parts, plan, samples.offsets)
    return TokenizedSet(dataset_key(spec, kind, seq_len, seed), kind, samples, order, eval_indices, samples.eval_arrays(eval_indices),
                        take_drawn=samples.take_drawn)


def realised_mix(stage: Stage, sets: dict[str, TokenizedSet], requests: dict[str, list[StoreRequest]], progress: Progress) -> dict[str, list[SourceDraw]]:
    """What each source of each mixture gave this stage: samples and tokens drawn, and its epochs
    drawn in all by the stage's end (the stream may have started in an earlier stage)."""
    drawn_by_kind = {}
    for kind, plan in stage.data.mixes.items():
        data = sets[kind]
        steps = sum(stage.data.source_at(step) == kind for step in range(1, progress.stage_step + 1))
        end = progress.data_position.get(data.key, 0)
        start = end - steps * stage.global_batch
        mixture, order = Mixture(plan), data.order
        before, after = mixture.drawn(start), mixture.drawn(end)
        draws = []
        for k, (part, request) in enumerate(zip(order.parts, requests[kind])):
            samples = int(after[k] - before[k])
            if OBJECTIVES[kind].samples_are_rows:  # rows vary in length: count the drawn rows' tokens
                rows = part.order.at(np.arange(before[k], after[k]))
                store = TokenStore(request.folder)
                tokens = sum(min(store.row_length(int(r)), stage.settings.seq_len) for r in rows)
            else:
                tokens = samples * stage.settings.seq_len
            inputs = request.data.files or [f"hub:{request.data.hub}"]
            draws.append(SourceDraw(inputs=inputs, quota=plan.quotas[k], samples=samples, tokens=tokens,
                                    epochs=round(float(after[k]) / max(part.n_train, 1), 4)))
        drawn_by_kind[kind] = draws
    return drawn_by_kind
