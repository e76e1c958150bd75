"""Held-out evaluation of a stage: each data set's objective evaluates its held-out rows
(harness/worker/objectives); the results are named by the objective's metric prefix
(eval/lm_loss, eval/sft_loss, eval/pref_loss, ...), and the stage's primary data set also gives
eval/loss and eval/ppl (perplexity only of a token log-likelihood: not of a preference loss).
Collective: every rank runs the same forwards.
"""
from __future__ import annotations

import math

from harness.plan import TrainSettings
from harness.worker.data import TokenizedSet
from harness.worker.objectives import RANK_OBJECTIVES
from harness.worker.strategy import DeepSpeedStrategy


def eval_metrics(strategy: DeepSpeedStrategy, sets: dict[str, TokenizedSet], primary: str, tokenizer, settings: TrainSettings,
                 micro_batch: int) -> dict[str, float]:
    """eval/<prefix>_loss and _ppl per data set, eval/loss and eval/ppl of the primary one, and the
    objectives' further metrics (eval/exact_match, ...)."""
    metrics: dict[str, float] = {}
    for kind, data in sets.items():
        objective = RANK_OBJECTIVES[kind]
        found = objective.evaluate(strategy, data, tokenizer, settings, micro_batch)
        loss, prefix = found.pop("loss"), objective.objective.metric_prefix
        metrics[f"eval/{prefix}_loss"] = loss
        if objective.objective.perplexity:
            metrics[f"eval/{prefix}_ppl"] = math.exp(min(loss, 50.0))
        if kind == primary:
            metrics["eval/loss"] = loss
            if objective.objective.perplexity:
                metrics["eval/ppl"] = metrics[f"eval/{prefix}_ppl"]
        metrics.update(found)
    return metrics
