"""One evaluation pass of the demo: held-out loss + house-style score of greedy answers.

Loss uses ``onecard.data.build_dataset`` on the held-out file, so templating and masking are exactly
training's; answers use ``onecard.eval.generate`` (greedy, batched, left padding, the same chat template).
The base model and the tuned model go through this same function with the same settings.
"""

from __future__ import annotations

from typing import Any

# house-style answers are at most 50 tokens + end-of-turn with SmolLM2's tokenizer (measured over all 184)
MAX_NEW_TOKENS = 56
BATCH_SIZE = 24  # all held-out prompts in one batch: fewer decode steps in total on CPU


def heldout_prompts(recipe) -> list[list[dict]]:
    """The held-out conversations without their final (reference) assistant message."""
    from onecard.data import detect_format, select_records, to_messages

    records = select_records(recipe, "eval")
    fmt = detect_format(records, recipe.data.format, recipe.task)
    return [to_messages(record, fmt)[:-1] for record in records]


def evaluate_style(model, tokenizer, recipe, prompts: list[list[dict]], seed: int) -> tuple[dict[str, Any], list[str]]:
    """``({"heldout_loss", "heldout_tokens", "style_score", <rule>...}, answers)`` for ``model``."""
    from onecard.data import build_dataset, pad_token_id, resolve_template
    from onecard.demo.style import style_score
    from onecard.eval.generate import generate_answers
    from onecard.eval.loss import heldout_loss

    examples = build_dataset(recipe, tokenizer, "eval").examples
    loss = heldout_loss(model, examples, pad_token_id(tokenizer), batch_size=BATCH_SIZE)
    template = resolve_template(tokenizer, recipe.data.chat_template)
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH_SIZE,
                               seed=seed, chat_template=template)
    style = style_score(answers)
    metrics = {"heldout_loss": loss["loss"], "heldout_tokens": loss["tokens"], "style_score": style["score"],
               **{f"rule_{k}": v for k, v in style.items() if k not in ("score", "n")}, "answers": style["n"]}
    return metrics, answers
