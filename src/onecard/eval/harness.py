"""``evaluate``: held-out loss + generation metrics of one model, optionally against its base (adapter disabled).

Called by ``onecard eval`` and by the training loop (``recipe.eval``: at the end and every N steps). Which
data: an explicit ``data_path``, else ``recipe.eval.path``, else the recipe's own eval split
(``data.eval_path`` / ``data.eval_fraction``). Loss uses ``onecard.data.build_dataset`` so templating, masking
and truncation are identical to training; generation metrics use the records whose last message is the
assistant's (the reference), prompted with the conversation before it.
"""

from __future__ import annotations

from typing import Any

from onecard.errors import UserError
from onecard.eval.generate import generate_answers
from onecard.eval.loss import heldout_loss
from onecard.eval.metrics import score_generations

HIGHER_IS_BETTER = {"loss": False, "perplexity": False, "exact_match": True, "token_f1": True, "rouge_l": True}
METRIC_LABELS = {"loss": "held-out loss", "perplexity": "perplexity", "exact_match": "exact match",
                 "token_f1": "token F1", "rouge_l": "ROUGE-L"}
FRACTION_METRICS = ("exact_match", "token_f1", "rouge_l")  # in [0, 1], shown as percentages
N_SAMPLES = 8  # generations kept in the result for the report


def eval_recipe(recipe, data_path: str | None):
    """The recipe whose ``eval`` split is the data to evaluate on (no packing: exact per-example loss)."""
    path = data_path or recipe.eval.path or recipe.data.eval_path
    fmt = "auto" if recipe.data.format in ("dpo", "kto") else recipe.data.format
    data = recipe.data.model_copy(update={"eval_path": path, "packing": False, "format": fmt})
    if not path and not recipe.data.eval_fraction:
        raise UserError("no evaluation data", where="onecard eval",
                        fix="pass --data FILE, or set eval.path / data.eval_path / data.eval_fraction in the recipe")
    # A preference-tuned model is still scored on chat references: loss and generation as for SFT.
    task = "sft" if recipe.task in ("dpo", "kto") else recipe.task
    scored = recipe.model_copy(update={"data": data, "task": task})
    _refuse_preference_data(scored, recipe.task)
    return scored


def _refuse_preference_data(recipe, trained_task: str) -> None:
    """Preference pairs have no single reference answer to score: say so, not that the task is wrong."""
    from onecard.data import select_records
    from onecard.data.formats import record_format

    records = select_records(recipe, "eval")
    fmt = record_format(records[0]) if records else None
    if fmt not in ("dpo", "kto"):
        return
    run = f"this {trained_task} run" if trained_task in ("dpo", "kto") else "onecard eval"
    raise UserError(f"{run} is scored on chat references (held-out loss, exact match, F1, ROUGE-L), but this file "
                    f"holds {fmt} preference records, which have no single reference answer", where=records[0].where,
                    fix='give --data a chat or alpaca file of prompts with the answers you want, e.g. '
                        '{"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": CHOSEN}]}'
                        "; the run's reward margins are in its metrics.jsonl (onecard report)")


def reference_pairs(recipe, max_examples: int | None) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) for every chat/alpaca record ending with an assistant message."""
    from onecard.data import detect_format, select_records, to_messages

    records = select_records(recipe, "eval")
    if not records:
        return []
    fmt = detect_format(records, recipe.data.format, recipe.task)
    if fmt not in ("chat", "alpaca"):
        return []
    pairs = []
    for record in records:
        messages = to_messages(record, fmt)
        if len(messages) >= 2 and messages[-1]["role"] == "assistant":
            pairs.append((messages[:-1], messages[-1]["content"]))
    return pairs[:max_examples] if max_examples else pairs


def evaluate(model, tokenizer, recipe, data_path: str | None = None, *, baseline: bool = False,
             max_new_tokens: int | None = None, max_examples: int | None = None, batch_size: int = 8,
             loss_batch_size: int | None = None, seed: int = 0, progress=None) -> dict[str, Any]:
    """Metrics of ``model`` (``"tuned"``) and, with ``baseline``, of the same object with its adapter disabled.

    ``batch_size``: prompts per generation call; ``loss_batch_size``: rows per held-out loss forward (default
    ``batch_size``). ``progress``: a rich ``Progress`` (or anything with ``add_task``/``advance``), or None.
    Returns ``{"data", "examples", "decoding", "tuned", "baseline"?, "delta"?, "samples"}``; metrics are
    loss, perplexity, tokens, exact_match, token_f1, rouge_l (the last three in [0, 1], absent without references).
    """
    from onecard.data import build_dataset, pad_token_id, resolve_template

    recipe = eval_recipe(recipe, data_path)
    max_new_tokens = max_new_tokens or recipe.eval.max_new_tokens
    max_examples = max_examples or recipe.eval.max_examples
    examples = build_dataset(recipe, tokenizer, "eval").examples
    examples = examples[:max_examples] if max_examples else examples
    pairs = reference_pairs(recipe, max_examples)
    template = resolve_template(tokenizer, recipe.data.chat_template) if pairs else None
    if baseline and not hasattr(model, "disable_adapter"):
        raise UserError("--baseline needs an adapter to switch off; this model has none",
                        where="onecard eval --baseline", fix="evaluate the base model separately with --model BASE_DIR")

    def one_pass(label: str) -> tuple[dict, list[str]]:
        on_step = _progress_task(progress, f"{label}: loss", len(examples))
        metrics = heldout_loss(model, examples, pad_token_id(tokenizer), loss_batch_size or batch_size, on_step)
        answers: list[str] = []
        if pairs:
            on_gen = _progress_task(progress, f"{label}: generate", len(pairs))
            answers = generate_answers(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size, seed,
                                       on_gen, chat_template=template)
            metrics.update(score_generations(answers, [r for _, r in pairs]))
        return metrics, answers

    tuned, tuned_answers = one_pass("tuned" if baseline else "model")
    result: dict[str, Any] = {
        "data": recipe.data.eval_path or f"{recipe.data.path} (eval_fraction {recipe.data.eval_fraction})",
        "examples": {"loss": len(examples), "generation": len(pairs)},
        "decoding": {"strategy": "greedy", "max_new_tokens": max_new_tokens, "seed": seed, "batch_size": batch_size},
        "tuned": tuned,
    }
    base_answers: list[str] = []
    if baseline:
        with model.disable_adapter():
            base, base_answers = one_pass("base")
        result["baseline"] = base
        result["delta"] = {k: tuned[k] - base[k] for k in HIGHER_IS_BETTER if k in tuned and k in base}
    result["samples"] = [
        {"prompt": prompt[-1]["content"], "reference": ref, "tuned": tuned_answers[i] if tuned_answers else None,
         **({"baseline": base_answers[i]} if base_answers else {})}
        for i, (prompt, ref) in enumerate(pairs[:N_SAMPLES])
    ]
    return result


def _progress_task(progress, description: str, total: int):
    if progress is None or total == 0:
        return None
    task = progress.add_task(description, total=total)
    return lambda n: progress.advance(task, n)

