"""Evaluation: greedy generation, reference metrics, held-out loss, the harness, and the HTML report.

Public API: ``evaluate(model, tokenizer, recipe, data_path=None, baseline=False, ...)`` (``harness.py``),
``generate_answers(model, tokenizer, conversations, ...)`` (``generate.py``), ``write_report(run_dir, out)``.
No torch import at module level.
"""

from onecard.eval.generate import generate_answers
from onecard.eval.harness import evaluate

__all__ = ["evaluate", "generate_answers"]
