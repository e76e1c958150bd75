"""The rank-side halves of the objectives (harness/objectives has the launch-side ones), registered
by the same kinds: a kind without its twin fails here, at import.

    base.py       the rank-side interface (RankObjective) and the held-out loss
    pretrain.py   blocks of the packed token stream
    finetune.py   rows with loss on responses, padded or packed; task metrics at eval
    preference.py pairs of a chosen and a rejected response (DPO, IPO, SimPO, ORPO); the reference
"""
from __future__ import annotations

from typing import Any

import torch

from harness.objectives import OBJECTIVES
from harness.records.token_store import StoreRequest
from harness.stages import Stage, stage_stores
from harness.worker.data import TokenizedSet, open_set
from harness.worker.mixture import open_mixture
from harness.worker.model import resize_embeddings
from harness.worker.objectives.base import RankObjective
from harness.worker.objectives.finetune import FinetuneRank
from harness.worker.objectives.preference import PreferenceRank
from harness.worker.objectives.pretrain import PretrainRank
from harness.worker.strategy import DeepSpeedStrategy

RANK_OBJECTIVES: dict[str, RankObjective] = {rank.objective.kind: rank for rank in (PretrainRank(), FinetuneRank(), PreferenceRank())}
if set(RANK_OBJECTIVES) != set(OBJECTIVES):
    raise ImportError(f"objectives without their rank-side twin: {sorted(set(OBJECTIVES) ^ set(RANK_OBJECTIVES))}")


def prepare_model(model: torch.nn.Module, tokenizer, stage: Stage) -> None:
    """Fit the model to its tokenizer (the embedding rows the launch side decided to add), then the
    model and tokenizer to every data set the stage reads (its objectives' prepare)."""
    resize_embeddings(model, stage.embedding_resize, stage.settings.seed)
    for kind, spec in stage.data.sets.items():
        RANK_OBJECTIVES[kind].prepare(model, tokenizer, stage, spec)


def begin_objectives(strategy: DeepSpeedStrategy, sets: dict[str, TokenizedSet], stage: Stage, start_digest: str, fresh: bool,
                     micro: int) -> dict[str, Any]:
    """Every data set's objective's begin (RankObjective.begin), once the engine holds its weights;
    their manifest records. Collective."""
    records: dict[str, Any] = {}
    for kind, data in sets.items():
        records.update(RANK_OBJECTIVES[kind].begin(strategy, data, stage, start_digest, fresh, micro))
    return records


def open_data(request: StoreRequest, seq_len: int, seed: int, pad_id: int) -> TokenizedSet:
    """The data set of a store, laid out by its objective (harness/worker/data.py open_set)."""
    return open_set(request, RANK_OBJECTIVES[request.kind], seq_len, seed, pad_id)


def open_stage_data(stage: Stage, pad_id: int) -> dict[str, TokenizedSet]:
    """Every data set the stage trains on, by kind: a store, or a weighted mixture of several
    (harness/worker/mixture.py)."""
    s, sets = stage.settings, {}
    for kind, requests in stage_stores(stage).items():
        plan = stage.data.mixes.get(kind)
        sets[kind] = open_data(requests[0], s.seq_len, s.seed, pad_id) if plan is None else \
            open_mixture(kind, stage.data.sets[kind], requests, plan, RANK_OBJECTIVES[kind], s.seq_len, s.seed, pad_id)
    return sets


__all__ = ["RANK_OBJECTIVES", "RankObjective", "begin_objectives", "open_data", "open_stage_data", "prepare_model"]
