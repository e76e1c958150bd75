"""Data for a stage, read from token stores that the launch side built (harness/records/token_store.py):
each data set's samples as its objective lays them out (harness/worker/objectives: pretrain blocks,
fine-tune rows), a held-out split, and a sample stream addressed by position so a resumed (or
next) stage continues where the last one stopped. Ranks read only the rows of their batches, so a
rank's memory does not grow with the corpus.

Order is deterministic from the seed and computed per position (harness/worker/order.py: keyed
permutations, nothing stored, so a rank's memory for it does not grow with the data set). Every
rank computes the same global indices for a step and takes its own slice, so no sampler state is
needed beyond one integer per data set: the number of samples consumed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from harness.objectives import OBJECTIVES
from harness.plan import DataSpec
from harness.records.token_store import LOSS_MASK, OFFSETS, STORE_FORMAT, TOKENS, StoreMeta, StoreRequest
from harness.stages import eval_size
from harness.worker.order import EpochOrder

IGNORE_INDEX = -100  # labels the loss skips (prompt and padding)
# DataSpec fields that change neither which rows a data position holds nor their order.
LAYOUT_FIELDS = {"packing", "exhausted"}
# DataSpec fields that came with the row shapes: a data stream's key counts them only when set.
ROW_SHAPE_FIELDS = {"rows", "instruction_field", "input_field", "output_field", "system_field", "history_field", "messages_field",
                    "tools_field", "chosen_field", "rejected_field"}


def token_count(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a batch; pretrain blocks and packed fine-tune rows have no padding and no mask."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


class TokenStore:
    """A token store on disk (format: harness/records/token_store.py), read row by row with pread.

    Reads go through the page cache, which the ranks of a node share, into buffers the size
    of one batch. Memory-mapping would share the page cache too, but every page a rank
    touches (and the kernel's readahead around it: ~1 MB per random row, measured) counts in
    that rank's RSS, so RSS would grow with the part of the corpus read; pread keeps a rank's
    memory independent of the corpus."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = StoreMeta.read(folder)
        if self.meta.format != STORE_FORMAT:
            raise RuntimeError(f"token store {folder} has format {self.meta.format}, this harness reads {STORE_FORMAT}; "
                               f"delete it and the next run rebuilds it")
        self.kind = self.meta.kind
        self._tokens = self._open(folder / TOKENS, self.meta.dtype, self.meta.tokens)
        self._offsets = self._open(folder / OFFSETS, np.int64, self.meta.rows + 1)
        self._loss_mask = self._open(folder / LOSS_MASK, np.uint8, self.meta.tokens) if OBJECTIVES[self.kind].loss_mask else None

    @staticmethod
    def _open(path: Path, dtype, count: int) -> tuple[int, np.dtype]:
        expected = count * np.dtype(dtype).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "no file"
            raise RuntimeError(f"token store damaged: {path} should have {expected} bytes, found {found}; "
                               f"delete {path.parent} and the next run rebuilds it")
        return os.open(path, os.O_RDONLY), np.dtype(dtype)

    @staticmethod
    def _read(file: tuple[int, np.dtype], start: int, count: int) -> np.ndarray:
        fd, dtype = file
        return np.frombuffer(os.pread(fd, count * dtype.itemsize, start * dtype.itemsize), dtype)

    def span(self, start: int, count: int) -> np.ndarray:
        """Tokens start .. start+count-1 of the whole stream."""
        return self._read(self._tokens, start, count)

    def row(self, r: int) -> np.ndarray:
        begin, end = self._read(self._offsets, r, 2)
        return self.span(int(begin), int(end - begin))

    def row_length(self, r: int) -> int:
        begin, end = self._read(self._offsets, r, 2)
        return int(end - begin)

    def row_with_mask(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """A row's tokens and their loss mask (0 none, 1 response, 2 end of a response)."""
        begin, end = (int(x) for x in self._read(self._offsets, r, 2))
        return self.span(begin, end - begin), self._read(self._loss_mask, begin, end - begin)


class Samples(Protocol):
    """How an objective lays out the samples of a store (harness/worker/objectives)."""

    count: int
    """Samples in the store (blocks of the token stream, or rows)."""

    def arrays(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The training layout of these samples (input_ids, labels, ...)."""

    def eval_arrays(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Held-out samples, as evaluation slices them into batches of micro_batch samples."""


class SampleOrder(Protocol):
    """Which samples train, in which order (harness/worker/order.py EpochOrder; a mixture's MixedOrder)."""

    n_train: int

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The sample indices at these stream positions."""

    def exhausted_by(self, end: int) -> str | None:
        """What would run out of unseen samples before position `end`, when the data set then stops
        (a mixture with data.exhausted: stop); None: the stream goes on."""


class LaysOutSamples(Protocol):
    """An objective's rank side, as far as data goes (harness/worker/objectives)."""

    def samples(self, store: TokenStore, spec: DataSpec, seq_len: int, pad_id: int) -> Samples:
        """The store's samples as this objective trains on them."""


@dataclass
class TokenizedSet:
    """One data set: its samples, the order its training samples are drawn in, and a small held-out set."""

    key: str
    kind: str
    samples: Samples
    order: SampleOrder
    eval_indices: np.ndarray
    eval: dict[str, np.ndarray]
    """The held-out samples, in memory (at most eval_max_samples)."""
    take_drawn: Callable[[], list[int]] = list
    """A mixture's: tokens each source gave this rank's training batches since the last call
    (harness/worker/mixture.py); one data set: []."""

    @property
    def n_train(self) -> int:
        return self.order.n_train


def dataset_key(spec: DataSpec, kind: str, seq_len: int, seed: int) -> str:
    """Identity of a data stream: the same key means a later stage continues its position."""
    # Keys as before row shapes and mixtures: those fields count only when set.
    unset = {name for name in ROW_SHAPE_FIELDS | {"sources"} if getattr(spec, name) == DataSpec.model_fields[name].default}
    text = json.dumps([spec.model_dump(mode="json", exclude=LAYOUT_FIELDS | unset), kind, seq_len, seed], sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def open_set(request: StoreRequest, objective: LaysOutSamples, seq_len: int, seed: int, pad_id: int, stream: int = 0) -> TokenizedSet:
    """The data set of a store built by the launch side, laid out by its objective, split and ordered
    with the seed (stream: tells apart the sources of a mixture, which share the seed)."""
    store = TokenStore(request.folder)
    spec = request.data
    laid_out = objective.samples(store, spec, seq_len, pad_id)
    order = EpochOrder(laid_out.count, eval_size(laid_out.count, spec), seed, stream)
    eval_indices = order.held_out()
    key = dataset_key(spec, request.kind, seq_len, seed)
    return TokenizedSet(key, request.kind, laid_out, order, eval_indices, laid_out.eval_arrays(eval_indices))


class SampleStream:
    """Training samples of one set in its order, addressed by global position."""

    def __init__(self, data: TokenizedSet):
        self.data = data

    def samples_at(self, start: int, count: int) -> np.ndarray:
        """Sample indices (fine-tune: store rows) at global positions start .. start+count-1 (crossing epochs as needed)."""
        return self.data.order.at(np.arange(start, start + count, dtype=np.int64))

    def batch(self, start: int, count: int) -> dict[str, torch.Tensor]:
        """The samples at global positions start .. start+count-1, in the training layout."""
        return {k: torch.from_numpy(v) for k, v in self.data.samples.arrays(self.samples_at(start, count)).items()}


def micro_batch_position(step_start: int, micro: int, accum_index: int, rank: int, world: int) -> int:
    """Global position of this rank's micro batch within a step that starts at step_start."""
    return step_start + (accum_index * world + rank) * micro


def eval_batches(data: TokenizedSet, micro: int, max_batches: int, rank: int, world: int) -> list[tuple[dict[str, torch.Tensor], bool]]:
    """This rank's share of the held-out set as (batch, counts) pairs. Every rank gets the same
    number of batches (ZeRO-3 forwards are collective); filler batches have counts=False."""
    n = len(data.eval["input_ids"])
    starts = list(range(0, n, micro))[:max_batches]
    per_rank = -(-len(starts) // world)
    mine = starts[rank::world]
    padded = [(s, True) for s in mine] + [(starts[0], False)] * (per_rank - len(mine))
    return [({k: torch.from_numpy(v[s : s + micro]) for k, v in data.eval.items()}, counts) for s, counts in padded]
