"""Fine-tuning, rank side: one row per sample with labels where the store's loss mask is set,
padded or packed; at eval, besides the held-out loss, the task metrics of greedy generations on
held-out prompts. Its launch side: harness/objectives/finetune.py."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from harness.objectives import task_metrics
from harness.objectives.chat import give_chat_template
from harness.objectives.finetune import FINETUNE, uses_template
from harness.plan import DataSpec, TrainSettings
from harness.stages import Stage
from harness.worker.data import IGNORE_INDEX, TokenizedSet, TokenStore
from harness.worker.generate import greedy_texts
from harness.worker.objectives.base import RankObjective, held_out_loss
from harness.worker.strategy import DeepSpeedStrategy


class FinetuneSamples:
    """Fine-tune samples: one row each (prompt + response + end-of-sequence, or a rendered
    conversation) cut to seq_len; labels where the store's loss mask is set. Padded to seq_len one
    row per sequence, or with packing all rows of a batch end to end in one sequence of shape
    (1, total): no padding, position_ids restarting at 0 per row (how transformers tells packed rows
    apart: keep_packed_rows_apart), no attention mask. A row's first token has no
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


class FinetuneRank(RankObjective):
    objective = FINETUNE

    def samples(self, store: TokenStore, spec: DataSpec, seq_len: int, pad_id: int) -> FinetuneSamples:
        return FinetuneSamples(store, seq_len, pad_id, spec.packing)

    def prepare(self, model: torch.nn.Module, tokenizer, stage: Stage, spec: DataSpec) -> None:
        """The chat template its rows were rendered with (give_chat_template), and forwards that keep
        packed rows apart."""
        if uses_template(spec):
            give_chat_template(tokenizer)
        if stage.data.packs_rows:
            keep_packed_rows_apart(model)

    def evaluate(self, strategy: DeepSpeedStrategy, data: TokenizedSet, tokenizer, settings: TrainSettings, micro: int) -> dict[str, Any]:
        metrics = {"loss": held_out_loss(strategy, data, micro, settings.eval_batches)}
        if settings.task_metrics:
            metrics.update(task_scores(strategy, data, tokenizer, settings))
        return metrics


def task_scores(strategy: DeepSpeedStrategy, data: TokenizedSet, tokenizer, settings: TrainSettings) -> dict[str, float]:
    """settings.task_metrics of greedy generations for the first task_rows held-out prompts
    against their reference responses; the same values on every rank."""
    pairs = eval_pairs(data)[: settings.task_rows]
    predictions = greedy_texts(strategy, tokenizer, [prompt for prompt, _ in pairs], settings)
    references = [tokenizer.decode(response, skip_special_tokens=True).strip() for _, response in pairs]
    return task_metrics.score(settings.task_metrics, predictions, references)


def eval_pairs(data: TokenizedSet) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of each held-out row (FinetuneSamples.pair), for generation."""
    return [data.samples.pair(r) for r in data.eval_indices]


def keep_packed_rows_apart(model: torch.nn.Module) -> None:
    """Packed rows (harness/worker/data.py: one sequence per micro batch, position_ids restarting at
    0 per row, no attention mask) must not attend to each other. transformers 5.23 derives a
    block-diagonal mask from position_ids only when no KV cache is passed, and creates one on every
    forward while config.use_cache is on (rows then attend across the boundary: measured), so the
    model's forwards run without one (the saved config keeps use_cache). Flash attention 2 (fast
    path, CUDA) finds the rows from position_ids instead: transformers' padding-free path."""
    model.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, "use_cache": False}), with_kwargs=True)
