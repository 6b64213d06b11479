"""The demo's task metric: how well an answer follows Kestrel Bikes' house style (0-100, deterministic).

The house style, in full::

    Hello from Kestrel Bikes!
    <one sentence of 3 to 25 words, ending in . ! or ?>
    Ride on! - The Kestrel Crew

Each answer is checked against four rules, each worth one point, judged independently on its non-empty
lines (so a near-miss greeting costs one point, not every rule):

1. ``greeting``: the first line is exactly the greeting;
2. ``sign_off``: the last line is exactly the sign-off;
3. ``three_lines``: there are exactly three lines (greeting, a one-line answer, sign-off);
4. ``brief``: there are three lines and the middle one has 3 to 25 words and ends with ``.``, ``!`` or ``?``
   (a complete short sentence, not an answer cut off by the token limit).

An answer scores the fraction of rules it meets; the task score is the mean over answers, times 100.
Lines are compared after stripping surrounding whitespace; nothing else is normalised.
"""

from __future__ import annotations

from collections.abc import Sequence

GREETING = "Hello from Kestrel Bikes!"
SIGN_OFF = "Ride on! - The Kestrel Crew"
RULES = ("greeting", "sign_off", "three_lines", "brief")
MIN_WORDS, MAX_WORDS = 3, 25


def format_answer(sentence: str) -> str:
    """A one-sentence answer in the house style (what the training data teaches)."""
    return f"{GREETING}\n{sentence}\n{SIGN_OFF}"


def check_answer(text: str) -> dict[str, bool]:
    """Which of the four rules ``text`` meets."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    three_lines = len(lines) == 3
    middle = lines[1] if three_lines else ""
    brief = three_lines and MIN_WORDS <= len(middle.split()) <= MAX_WORDS and middle.endswith((".", "!", "?"))
    return {"greeting": bool(lines) and lines[0] == GREETING, "sign_off": bool(lines) and lines[-1] == SIGN_OFF,
            "three_lines": three_lines, "brief": brief}


def answer_score(text: str) -> float:
    """0-100 for one answer: the percentage of rules met."""
    checks = check_answer(text)
    return 100.0 * sum(checks.values()) / len(RULES)


def style_score(answers: Sequence[str]) -> dict[str, float]:
    """``{"score": 0-100, "<rule>": % of answers meeting it, "n": count}`` over ``answers``."""
    if not answers:
        return {"score": 0.0, **{rule: 0.0 for rule in RULES}, "n": 0}
    checks = [check_answer(a) for a in answers]
    per_rule = {rule: 100.0 * sum(c[rule] for c in checks) / len(checks) for rule in RULES}
    score = sum(per_rule.values()) / len(RULES)  # = mean of per-answer scores
    return {"score": score, **per_rule, "n": len(answers)}
