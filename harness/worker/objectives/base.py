"""The rank-side half of an objective: how a batch is built from its token-store records, its
loss and step metrics, and its evaluation. The launch-side twin (harness/objectives/) says what
the records are; `objective` links the two.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from harness.objectives import Objective
from harness.plan import DataSpec, TrainSettings
from harness.stages import Stage
from harness.worker.data import IGNORE_INDEX, Samples, TokenizedSet, TokenStore, eval_batches
from harness.worker.strategy import DeepSpeedStrategy


class RankObjective:
    """One objective, rank side. The defaults are next-token prediction on the batch's labels."""

    objective: ClassVar[Objective]
    """Its launch-side twin (kind, metric prefix, ...)."""

    def samples(self, store: TokenStore, spec: DataSpec, seq_len: int, pad_id: int) -> Samples:
        """The store's samples as this objective trains on them (harness/worker/data.py Samples)."""
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module, tokenizer, stage: Stage, spec: DataSpec) -> None:
        """Fit the model and tokenizer to this objective's data, before the engine is built."""

    def begin(self, strategy: DeepSpeedStrategy, data: TokenizedSet, stage: Stage, start_digest: str, fresh: bool, micro: int) -> dict[str, Any]:
        """Once the engine holds the weights the stage goes on from (fresh: its start weights, whose
        digest is start_digest; else a checkpoint's), before any step or eval: what the objective
        derives from the start weights. Returns records for the manifest ({}: none). Collective."""
        return {}

    def loss(self, engine, batch: dict[str, torch.Tensor], settings: TrainSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro batch's loss (what backward runs on) and its step metrics (each a mean over the
        micro batch; the step logs their mean over micro batches and ranks)."""
        return engine(**batch).loss, {}

    def probe_batch(self, stage: Stage, micro: int, vocab: int) -> dict[str, torch.Tensor]:
        """micro_batch auto's probe (harness/worker/batch_probe.py): micro rows of seq_len tokens with
        loss on every one, no data's batch is larger. Packed rows come as one sequence with positions
        restarting per row, as the data gives them."""
        seq_len = stage.settings.seq_len
        ids = torch.randint(0, vocab, (micro, seq_len), generator=torch.Generator().manual_seed(stage.settings.seed))
        if stage.data.packs_rows:
            flat = ids.reshape(1, -1)
            return {"input_ids": flat, "labels": flat, "position_ids": torch.arange(seq_len).repeat(micro)[None]}
        return {"input_ids": ids, "labels": ids}

    def evaluate(self, strategy: DeepSpeedStrategy, data: TokenizedSet, tokenizer, settings: TrainSettings, micro: int) -> dict[str, Any]:
        """{'loss': held-out loss, and any further eval/<key>: value}, the same on every rank. Collective."""
        return {"loss": held_out_loss(strategy, data, micro, settings.eval_batches)}


@torch.no_grad()
def held_out_loss(strategy: DeepSpeedStrategy, data: TokenizedSet, micro: int, max_batches: int) -> float:
    """Mean loss over every labelled token of up to max_batches held-out batches. Every rank runs
    the same number of forwards: under ZeRO-3 a forward gathers parameters collectively."""
    total, count = 0.0, 0.0
    strategy.module.eval()
    for batch, counts in eval_batches(data, micro, max_batches, strategy.rank, strategy.world_size):
        logits = strategy.logits(batch["input_ids"], batch.get("attention_mask"))
        labels = batch["labels"][:, 1:].to(logits.device)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        if counts:
            total += loss.item()
            count += (labels != IGNORE_INDEX).sum().item()
    strategy.module.train()
    total, count = strategy.all_reduce_sum([total, count])
    return total / max(count, 1.0)


def as_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}
