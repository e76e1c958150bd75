"""Data for a stage: pretrain text packed into fixed-length blocks, fine-tune pairs with
loss only on response tokens, a held-out split, and a sample stream addressed by
position so a resumed (or next) stage continues where the last one stopped.

Order is deterministic from the seed: epoch e visits the training samples in
the permutation drawn from (seed, e). Every rank computes the same global
indices for a step and takes its own slice, so no sampler state is needed
beyond one integer per data set: the number of samples consumed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from harness.plan import DataSpec
from harness.stages import eval_size

IGNORE_INDEX = -100  # labels the loss skips (prompt and padding)


def token_count(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a batch; packed pretrain batches have no padding and no mask."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


@dataclass
class TokenizedSet:
    """One data set, tokenized and split. Arrays are [samples, seq_len]."""

    key: str
    kind: str
    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    eval_pairs: list[tuple[str, str]]
    """(prompt, response) texts of held-out fine-tune rows, for exact-match generation."""

    @property
    def n_train(self) -> int:
        return len(self.train["input_ids"])


def dataset_key(spec: DataSpec, kind: str, seq_len: int, seed: int) -> str:
    """Identity of a data stream: the same key means a later stage continues its position."""
    text = json.dumps([spec.model_dump(mode="json"), kind, seq_len, seed], sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _load_rows(spec: DataSpec, cache_dir: Path) -> datasets.Dataset:
    if spec.hub is not None:
        return datasets.load_dataset(spec.hub, split="train", cache_dir=str(cache_dir))
    fmt = spec.resolved_format()
    extra = {"sample_by": "paragraph"} if fmt == "text" else {}
    return datasets.load_dataset(fmt, data_files=spec.files, split="train", cache_dir=str(cache_dir), **extra)


def _split(n: int, spec: DataSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train indices and the held-out eval indices (the last eval_size after shuffling)."""
    order = np.random.default_rng(seed).permutation(n)
    n_eval = eval_size(n, spec)
    return order[:-n_eval], order[-n_eval:]


def load_pretrain(spec: DataSpec, tokenizer, seq_len: int, seed: int, cache_dir: Path) -> TokenizedSet:
    rows = _load_rows(spec, cache_dir)
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(rows[spec.text_field]), add_special_tokens=False)["input_ids"]
    stream = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
    n_blocks = len(stream) // seq_len
    if n_blocks < 2:
        raise ValueError(f"{spec.files or spec.hub}: {len(stream)} tokens make fewer than 2 blocks of {seq_len}")
    blocks = stream[: n_blocks * seq_len].reshape(n_blocks, seq_len)
    train_idx, eval_idx = _split(n_blocks, spec, seed)

    def arrays(idx):
        # No attention mask: every position is a real token, and an all-ones mask makes the
        # model build an explicit mask instead of taking the causal fast path (measured on H100).
        return {"input_ids": blocks[idx], "labels": blocks[idx]}

    return TokenizedSet(dataset_key(spec, "pretrain", seq_len, seed), "pretrain", arrays(train_idx), arrays(eval_idx), [])


def load_finetune(spec: DataSpec, tokenizer, seq_len: int, seed: int, cache_dir: Path) -> TokenizedSet:
    rows = _load_rows(spec, cache_dir)
    for field in (spec.prompt_field, spec.response_field):
        if field not in rows.column_names:
            raise ValueError(f"{spec.files or spec.hub}: no column {field!r}; columns: {rows.column_names}")
    prompts, responses = list(rows[spec.prompt_field]), list(rows[spec.response_field])
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    n = len(prompts)
    input_ids = np.full((n, seq_len), tokenizer.pad_token_id, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=np.int64)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        full = (list(p) + list(r) + [tokenizer.eos_token_id])[:seq_len]
        input_ids[i, : len(full)] = full
        mask[i, : len(full)] = 1
        labels[i, len(p) : len(full)] = full[len(p) :]
    train_idx, eval_idx = _split(n, spec, seed)

    def arrays(idx):
        return {"input_ids": input_ids[idx], "labels": labels[idx], "attention_mask": mask[idx]}

    pairs = [(prompts[i], responses[i]) for i in eval_idx]
    return TokenizedSet(dataset_key(spec, "finetune", seq_len, seed), "finetune", arrays(train_idx), arrays(eval_idx), pairs)


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

    def batch(self, start: int, count: int) -> dict[str, torch.Tensor]:
        """Samples at global positions start .. start+count-1 (crossing epochs as needed)."""
        n = self.data.n_train
        idx = np.array([self._order(p // n)[p % n] for p in range(start, start + count)])
        return {k: torch.from_numpy(v[idx]) for k, v in self.data.train.items()}


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
