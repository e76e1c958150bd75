"""Data for a stage, read from token stores that the launch side built (harness/token_store.py):
pretrain text packed into fixed-length blocks, fine-tune rows with loss only on response tokens
(the store's loss mask: responses, every assistant turn of a chat), padded one row per sequence
or packed (`packing: true`) end to end into one sequence per micro batch, a held-out split, and
a sample stream addressed by position so a resumed (or next) stage continues where the last one
stopped. Ranks read only the rows of their batches, so a
rank's memory does not grow with the corpus.

Order is deterministic from the seed: epoch e visits the training samples in
the permutation drawn from (seed, e). Every rank computes the same global
indices for a step and takes its own slice, so no sampler state is needed
beyond one integer per data set: the number of samples consumed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.plan import DataSpec
from harness.stages import eval_size
from harness.token_store import LOSS_MASK, OFFSETS, STORE_FORMAT, TOKENS, StoreMeta, StoreRequest

IGNORE_INDEX = -100  # labels the loss skips (prompt and padding)
# DataSpec fields that change neither which rows a data position holds nor their order.
LAYOUT_FIELDS = {"packing"}
# DataSpec fields that came with the row shapes: a data stream's key counts them only when set.
ROW_SHAPE_FIELDS = {"rows", "instruction_field", "input_field", "output_field", "system_field", "history_field", "messages_field"}


def token_count(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a batch; pretrain blocks and packed fine-tune rows have no padding and no mask."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


class TokenStore:
    """A token store on disk (format: harness/token_store.py), read row by row with pread.

    Reads go through the page cache, which the ranks of a node share, into buffers the size
    of one batch. Memory-mapping would share the page cache too, but every page a rank
    touches (and the kernel's readahead around it: ~1 MB per random row, measured) counts in
    that rank's RSS, so RSS would grow with the part of the corpus read; pread keeps a rank's
    memory independent of the corpus."""

    def __init__(self, folder: Path):
        self.meta = StoreMeta.read(folder)
        if self.meta.format != STORE_FORMAT:
            raise RuntimeError(f"token store {folder} has format {self.meta.format}, this harness reads {STORE_FORMAT}; "
                               f"delete it and the next run rebuilds it")
        self.kind = self.meta.kind
        self._tokens = self._open(folder / TOKENS, self.meta.dtype, self.meta.tokens)
        self._offsets = self._open(folder / OFFSETS, np.int64, self.meta.rows + 1)
        self._loss_mask = self._open(folder / LOSS_MASK, np.uint8, self.meta.tokens) if self.kind == "finetune" else None

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

    def row_with_mask(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """A fine-tune row's tokens and their loss mask (0 none, 1 response, 2 end of a response)."""
        begin, end = (int(x) for x in self._read(self._offsets, r, 2))
        return self.span(begin, end - begin), self._read(self._loss_mask, begin, end - begin)


class PretrainSamples:
    """Pretrain samples: the store's token stream cut into blocks of seq_len (the last partial
    block dropped). No attention mask: every position is a real token, and an all-ones mask
    makes the model build an explicit mask instead of taking the causal fast path (measured on H100)."""

    def __init__(self, store: TokenStore, seq_len: int):
        self.store, self.seq_len = store, seq_len
        self.count = store.meta.tokens // seq_len
        if self.count < 2:
            raise ValueError(f"{store.meta.inputs}: {store.meta.tokens} tokens make fewer than 2 blocks of {seq_len}")

    def arrays(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        ids = np.stack([self.store.span(int(i) * self.seq_len, self.seq_len) for i in indices]).astype(np.int64)
        return {"input_ids": ids, "labels": ids}

    def eval_arrays(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return self.arrays(indices)


class FinetuneSamples:
    """Fine-tune samples: one row each (prompt + response + end-of-sequence, or a rendered
    conversation) cut to seq_len; labels where the store's loss mask is set. Padded to seq_len one
    row per sequence, or with packing all rows of a batch end to end in one sequence of shape
    (1, total): no padding, position_ids restarting at 0 per row (how transformers tells packed rows
    apart: harness/worker/model.py prepare_for_data), no attention mask. A row's first token has no
    label (unpacked, no token predicts it either), so the loss is the same either way."""

    def __init__(self, store: TokenStore, seq_len: int, pad_id: int, packing: bool = False):
        self.store, self.seq_len, self.pad_id, self.packing = store, seq_len, pad_id, packing
        self.count = store.meta.rows

    def _row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and labels of row r, cut to seq_len."""
        ids, mask = (a[: self.seq_len].astype(np.int64) for a in self.store.row_with_mask(r))
        return ids, np.where(mask > 0, ids, IGNORE_INDEX)

    def arrays(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The training layout of these rows: packed or padded."""
        return self.packed(indices) if self.packing else self.padded(indices)

    def eval_arrays(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Held-out rows, padded (evaluation slices them into batches of micro_batch rows)."""
        return self.padded(indices)

    def padded(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        n = len(indices)
        input_ids = np.full((n, self.seq_len), self.pad_id, dtype=np.int64)
        labels = np.full((n, self.seq_len), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((n, self.seq_len), dtype=np.int64)
        for i, r in enumerate(indices):
            ids, row_labels = self._row(r)
            input_ids[i, : len(ids)] = ids
            labels[i, : len(ids)] = row_labels
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    def packed(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self._row(r) for r in indices]
        for _, row_labels in rows:
            row_labels[0] = IGNORE_INDEX  # else the previous row's last token would predict it
        return {"input_ids": np.concatenate([ids for ids, _ in rows])[None],
                "labels": np.concatenate([labels for _, labels in rows])[None],
                "position_ids": np.concatenate([np.arange(len(ids)) for ids, _ in rows])[None]}

    def pair(self, r: int) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of row r for generation: the prompt is everything before its
        last response (a chat: the conversation up to and with the generation prompt of its last
        assistant turn), the response that response's content, without its end of turn."""
        ids, mask = self.store.row_with_mask(r)
        trained = np.flatnonzero(mask)
        untrained_before = np.flatnonzero(mask[: trained[-1]] == 0)
        start = int(untrained_before[-1]) + 1 if len(untrained_before) else 0
        return ids[:start].tolist(), ids[start:][mask[start:] == 1].tolist()


@dataclass
class TokenizedSet:
    """One data set: its samples, split into training indices and a small held-out set."""

    key: str
    kind: str
    samples: PretrainSamples | FinetuneSamples
    train_indices: np.ndarray
    eval: dict[str, np.ndarray]
    """The held-out samples, in memory (at most eval_max_samples)."""
    eval_pairs: list[tuple[list[int], list[int]]]
    """(prompt ids, response ids) of held-out fine-tune rows, for exact-match generation."""

    @property
    def n_train(self) -> int:
        return len(self.train_indices)


def dataset_key(spec: DataSpec, kind: str, seq_len: int, seed: int) -> str:
    """Identity of a data stream: the same key means a later stage continues its position."""
    unset = {name for name in ROW_SHAPE_FIELDS if getattr(spec, name) == DataSpec.model_fields[name].default}  # keys as before row shapes
    text = json.dumps([spec.model_dump(mode="json", exclude=LAYOUT_FIELDS | unset), kind, seq_len, seed], sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _split(n: int, spec: DataSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train indices and the held-out eval indices (the last eval_size after shuffling)."""
    order = np.random.default_rng(seed).permutation(n)
    n_eval = eval_size(n, spec)
    return order[:-n_eval], order[-n_eval:]


def open_set(request: StoreRequest, seq_len: int, seed: int, pad_id: int) -> TokenizedSet:
    """The data set of a store built by the launch side, split with the seed."""
    store = TokenStore(request.folder)
    spec = request.data
    samples = PretrainSamples(store, seq_len) if request.kind == "pretrain" else FinetuneSamples(store, seq_len, pad_id, spec.packing)
    train_indices, eval_indices = _split(samples.count, spec, seed)
    pairs = [samples.pair(r) for r in eval_indices] if request.kind == "finetune" else []
    key = dataset_key(spec, request.kind, seq_len, seed)
    return TokenizedSet(key, request.kind, samples, train_indices, samples.eval_arrays(eval_indices), pairs)


class SampleStream:
    """Training samples of one set in seeded epoch order, addressed by global position."""

    def __init__(self, data: TokenizedSet, seed: int):
        self.data = data
        self.seed = seed
        self._epoch_orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epoch_orders:
            self._epoch_orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.data.n_train)}
        return self._epoch_orders[epoch]

    def samples_at(self, start: int, count: int) -> np.ndarray:
        """Sample indices (fine-tune: store rows) at global positions start .. start+count-1 (crossing epochs as needed)."""
        n = self.data.n_train
        return self.data.train_indices[np.array([self._order(p // n)[p % n] for p in range(start, start + count)])]

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
