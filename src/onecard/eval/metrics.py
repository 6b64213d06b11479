"""Reference-based text metrics: exact match, token F1 (SQuAD), ROUGE-L F-measure.

Exact match and F1 follow the official SQuAD v1.1 evaluation script (``evaluate-v1.1.py``,
Rajpurkar et al. 2016): lowercase, drop punctuation and the articles a/an/the, collapse whitespace; F1 over
the multiset of tokens.

ROUGE-L is written here (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", sec. 3.1:
F-measure of the longest common subsequence, with beta = 1 as in Google's ``rouge-score`` ``rougeL``)
instead of depending on ``rouge-score``: that package (last release 0.1.2, 2022) pulls in nltk and absl
for a Porter stemmer we do not use, and its default tokenizer keeps only ``[a-z0-9]``, so any non-ASCII
answer (Chinese, accented words) scores 0. Here ROUGE-L runs on the same SQuAD-normalised tokens as F1;
a test checks it against ``rouge-score`` on ASCII text when that package is installed.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:  # SQuAD v2 convention: both empty = 1, one empty = 0
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, O(len(a) * len(b)) time and O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) on normalised tokens."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_generations(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match, token F1 and ROUGE-L over paired predictions and references (each in [0, 1])."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(predictions)
    if n == 0:
        return {"exact_match": 0.0, "token_f1": 0.0, "rouge_l": 0.0, "n": 0}
    pairs = list(zip(predictions, references))
    return {
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / n,
        "token_f1": sum(token_f1(p, r) for p, r in pairs) / n,
        "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / n,
        "n": n,
    }
