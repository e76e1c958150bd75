"""Pretraining, rank side: the store's token stream cut into blocks of seq_len, every token
labelled. Its launch side: harness/objectives/pretrain.py."""
from __future__ import annotations

import numpy as np

from harness.objectives.pretrain import PRETRAIN
from harness.plan import DataSpec
from harness.worker.data import TokenStore
from harness.worker.objectives.base import RankObjective


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


class PretrainRank(RankObjective):
    objective = PRETRAIN

    def samples(self, store: TokenStore, spec: DataSpec, seq_len: int, pad_id: int) -> PretrainSamples:
        return PretrainSamples(store, seq_len)
