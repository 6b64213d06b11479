"""Text metrics: SQuAD normalisation, F1 and ROUGE-L on hand-checked cases, and against rouge-score if present."""

from __future__ import annotations

import pytest

from onecard.eval.metrics import exact_match, lcs_length, normalize_answer, rouge_l, score_generations, token_f1


def test_normalize_like_squad():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"


def test_exact_match_ignores_case_punct_articles():
    assert exact_match("The answer is 42.", "answer is 42") == 1.0
    assert exact_match("41", "42") == 0.0


def test_token_f1_hand_computed():
    # pred tokens: [paris, is, capital], ref: [capital, of, france, is, paris] -> common 3, P=1, R=3/5
    assert token_f1("Paris is the capital", "The capital of France is Paris") == pytest.approx(2 * 1 * 0.6 / 1.6)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("dog", "cat") == 0.0


def test_rouge_l_order_matters_unlike_f1():
    # same bag of words, reversed order: F1 = 1, LCS = 1 of 3 tokens
    assert token_f1("one two three", "three two one") == 1.0
    assert rouge_l("one two three", "three two one") == pytest.approx(1 / 3)
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # CLRS example
    assert rouge_l("über straße", "über straße") == 1.0  # non-ASCII kept (rouge-score would give 0)


def test_score_generations_means():
    scores = score_generations(["yes", "no"], ["yes", "maybe"])
    assert scores == {"exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.5, "n": 2}
    with pytest.raises(ValueError):
        score_generations(["a"], [])


def test_rouge_l_matches_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    cases = [("police killed gunman", "police kill gunman"), ("one two three four", "four three two one x"),
             ("fine tuning on one gpu needs memory", "tuning needs memory on one card")]
    for pred, ref in cases:
        assert rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)
