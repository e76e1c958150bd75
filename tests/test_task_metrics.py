"""Task metrics against values computed by hand on fixed strings (pure: no torch, no launch)."""
from __future__ import annotations

import pytest

from harness.plan import PlanError, TrainSettings, parse_plan
from harness.objectives.task_metrics import METRIC_NAMES, SCORERS, exact_match, metric_keys, normalize_answer, score, token_f1

from conftest import REPO, finetune_phase, make_plan


def test_squad_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"


def test_exact_match_after_normalisation():
    assert exact_match("Paris!", "paris") == 1.0
    assert exact_match("the cat", "cat") == 1.0
    assert exact_match("cats", "cat") == 0.0


def test_token_f1_by_hand():
    # "cat sat" against "cat sat down": 2 common words, precision 2/2, recall 2/3 -> F1 0.8
    assert token_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    # words count with multiplicity: "x x y" vs "x y y": common = min(2,1) + min(1,2) = 2, precision 2/3, recall 2/3 -> 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0 and token_f1("dog", "cat") == 0.0


def test_bleu_by_hand():
    # hyp "the cat sat on the mat", ref "the cat sat on a mat": clipped n-gram precisions
    # 5/6, 3/5, 2/4, 1/3, same length (brevity penalty 1): 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4)
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert score(["bleu"], ["the cat sat on the mat"], ["the cat sat on a mat"])["eval/bleu"] == pytest.approx(expected, abs=1e-9)
    assert score(["bleu"], ["ab cd ef gh"], ["ab cd ef gh"])["eval/bleu"] == pytest.approx(100.0)
    # corpus BLEU-4 has no 4-gram to match in segments of 3 words: 0 even for a perfect answer
    assert score(["bleu"], ["ab cd ef"], ["ab cd ef"])["eval/bleu"] == 0.0


def test_chrf_by_hand():
    # hyp "ab", ref "abc": character 1-grams P 2/2 R 2/3, 2-grams P 1/1 R 1/2; higher orders have
    # no hyp n-gram and are left out of the average: P 1, R 7/12, F2 = 5 P R / (4 P + R) = 7/11
    assert score(["chrf"], ["ab"], ["abc"])["eval/chrf"] == pytest.approx(100 * 7 / 11)
    assert score(["chrf"], ["xyz"], ["abc"])["eval/chrf"] == 0.0


def test_rouge_by_hand():
    # unigrams: 5 of 6 shared each way; bigrams: the-cat cat-sat sat-on of 5; LCS "the cat sat on mat" = 5 of 6
    values = score(["rouge"], ["the cat sat on the mat"], ["the cat sat on a mat"])
    assert values == pytest.approx({"eval/rouge1": 5 / 6, "eval/rouge2": 3 / 5, "eval/rougeL": 5 / 6})
    # the Porter stemmer makes "cats" and "cat" one word
    assert score(["rouge"], ["cats"], ["cat"])["eval/rouge1"] == 1.0


def test_scores_average_over_rows_and_keys_follow_the_names():
    values = score(["exact_match", "f1"], ["paris", "london", "big red"], ["Paris", "Berlin", "red"])
    assert values == pytest.approx({"eval/exact_match": 1 / 3, "eval/f1": (1 + 0 + 2 / 3) / 3})
    assert metric_keys(["exact_match", "rouge", "chrf"]) == ["eval/exact_match", "eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/chrf"]
    assert set(SCORERS) == set(METRIC_NAMES)
    with pytest.raises(ValueError, match="one prediction per reference"):
        score(["f1"], ["a"], ["a", "b"])


def test_task_eval_fields_default_to_exact_match_and_refuse_unknown_metrics():
    settings = TrainSettings()
    assert (settings.task_metrics, settings.task_rows, settings.max_new_tokens, settings.generation_gather, settings.eval_on_start) == (
        ["exact_match"], 16, 64, True, False)
    plan = make_plan("t", [finetune_phase("sft", task_metrics=["bleu", "meteor"], task_rows=0)], port=29500)
    with pytest.raises(PlanError) as error:
        parse_plan(plan, REPO)
    problems = {path: (value, allowed) for path, value, allowed in error.value.problems}
    assert problems["phases[0].task_metrics[1]"] == ("meteor", "Input should be 'exact_match', 'f1', 'bleu', 'chrf' or 'rouge'")
    assert problems["phases[0].task_rows"][0] == 0
