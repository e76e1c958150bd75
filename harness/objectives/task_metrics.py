"""Task metrics of generated text against reference text: pure functions on strings, no torch.

The worker computes them on greedy generations of held-out fine-tune rows (see
harness/worker/objectives/finetune.py); the launch side needs only the names (the plan's
`task_eval.metrics`). Each metric name gives one or more `eval/<key>` values:

  exact_match  share of rows whose prediction equals the reference after SQuAD's
               normalisation (lower case, no punctuation, no a/an/the, single spaces); 0-1
  f1           SQuAD token F1 of normalised words, averaged over rows; 0-1
  bleu         sacrebleu corpus BLEU (13a tokenisation, exp smoothing); 0-100 as sacrebleu prints it;
               0 on a corpus whose segments all have fewer than 4 tokens (no 4-grams to match)
  chrf         sacrebleu corpus chrF (character 6-grams, beta 2); 0-100
  rouge        rouge-score ROUGE-1, ROUGE-2 and ROUGE-L F-measure (Porter stemmer), averaged
               over rows: eval/rouge1, eval/rouge2, eval/rougeL; 0-1
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, get_args

from harness.plan import MetricName

METRIC_NAMES: tuple[str, ...] = get_args(MetricName)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both are equal after normalize_answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1 over normalised words: the harmonic mean of word precision and recall, words
    counted with multiplicity. Two empty answers agree (1.0); one empty answer scores 0.0."""
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _exact_match(predictions: list[str], references: list[str]) -> dict[str, float]:
    return {"exact_match": _mean([exact_match(p, r) for p, r in zip(predictions, references)])}


def _f1(predictions: list[str], references: list[str]) -> dict[str, float]:
    return {"f1": _mean([token_f1(p, r) for p, r in zip(predictions, references)])}


def _bleu(predictions: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu  # imported where used: the launch side loads this module for the names only

    return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score}


def _chrf(predictions: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu

    return {"chrf": sacrebleu.corpus_chrf(predictions, [references]).score}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer  # imports nltk (~1.4 s): only when ROUGE is asked for

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    return {kind: _mean([s[kind].fmeasure for s in scores]) for kind in ROUGE_TYPES}


SCORERS: dict[str, Callable[[list[str], list[str]], dict[str, float]]] = {
    "exact_match": _exact_match, "f1": _f1, "bleu": _bleu, "chrf": _chrf, "rouge": _rouge,
}


def metric_keys(names: list[str]) -> list[str]:
    """The eval/ keys the named metrics produce, in order (rouge gives three)."""
    return [f"eval/{key}" for name in names for key in (ROUGE_TYPES if name == "rouge" else (name,))]


def score(names: list[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    """{'eval/<key>': value} of each named metric over the rows (one prediction per reference)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"one prediction per reference, at least one row: got {len(predictions)} and {len(references)}")
    values: dict[str, float] = {}
    for name in names:
        values.update({f"eval/{key}": value for key, value in SCORERS[name](predictions, references).items()})
    return values
