"""The rank-side halves of the objectives (harness/objectives has the launch-side ones), registered
by the same kinds: a kind without its twin fails here, at import.

    base.py       the rank-side interface (RankObjective) and the held-out loss
    pretrain.py   blocks of the packed token stream
    finetune.py   rows with loss on responses, padded or packed; task metrics at eval
"""
from __future__ import annotations

import torch

from harness.objectives import OBJECTIVES
from harness.records.token_store import StoreRequest
from harness.stages import Stage
from harness.worker.data import TokenizedSet, open_set
from harness.worker.model import resize_embeddings
from harness.worker.objectives.base import RankObjective
from harness.worker.objectives.finetune import FinetuneRank
from harness.worker.objectives.pretrain import PretrainRank

RANK_OBJECTIVES: dict[str, RankObjective] = {rank.objective.kind: rank for rank in (PretrainRank(), FinetuneRank())}
if set(RANK_OBJECTIVES) != set(OBJECTIVES):
    raise ImportError(f"objectives without their rank-side twin: {sorted(set(OBJECTIVES) ^ set(RANK_OBJECTIVES))}")


def prepare_model(model: torch.nn.Module, tokenizer, stage: Stage) -> None:
    """Fit the model to its tokenizer (the embedding rows the launch side decided to add), then the
    model and tokenizer to every data set the stage reads (its objectives' prepare)."""
    resize_embeddings(model, stage.embedding_resize, stage.settings.seed)
    for kind, spec in stage.data.sets.items():
        RANK_OBJECTIVES[kind].prepare(model, tokenizer, stage, spec)


def open_data(request: StoreRequest, seq_len: int, seed: int, pad_id: int) -> TokenizedSet:
    """The data set of a store, laid out by its objective (harness/worker/data.py open_set)."""
    return open_set(request, RANK_OBJECTIVES[request.kind], seq_len, seed, pad_id)


__all__ = ["RANK_OBJECTIVES", "RankObjective", "open_data", "prepare_model"]
