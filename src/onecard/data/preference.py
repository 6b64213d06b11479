"""Preference data: DPO pairs (``prompt`` / ``chosen`` / ``rejected``) and KTO examples (``prompt`` / ``completion`` / ``label``).

Records are read with :func:`~onecard.data.read_records` (file:line on every complaint) and validated field by
field here, so a bad record names its file, line and field. The chat template is applied as for SFT: the prompt
is rendered with the generation prompt, and the completion is the assistant turn's text up to and including its
end-of-turn token -- located with the same :func:`~onecard.data.masking.assistant_spans` the SFT masking uses, so
DPO trains exactly the tokens SFT would. Prompt and completion are tokenized separately (as trl's
``DPOTrainer``/``KTOTrainer`` do), which lets KTO pair a prompt with another example's completion for its KL
estimate without re-tokenizing.

Truncation: the prompt is cut from the *left* to ``preference.max_prompt_len`` (the end of a prompt is what the
completion answers), then each completion is cut so prompt + completion <= ``data.seq_len``. An example left with
no completion token is dropped and counted; if every example is dropped, that is an error naming the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from onecard.data.dataset import DataStats, select_records
from onecard.data.formats import ROLES, record_format
from onecard.data.masking import IGNORE_INDEX, assistant_spans
from onecard.data.records import Record
from onecard.data.templates import resolve_template
from onecard.errors import UserError

DPO_EXAMPLE = '{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}'
KTO_EXAMPLE = '{"prompt": "What is 2+2?", "completion": "4", "label": true}'
_FIELDS = {"dpo": ("prompt", "chosen", "rejected"), "kto": ("prompt", "completion", "label")}
_EXAMPLES = {"dpo": DPO_EXAMPLE, "kto": KTO_EXAMPLE}


@dataclass
class PreferenceDataset:
    """Tokenized preference examples.

    DPO example: ``prompt_ids``, ``chosen_ids``, ``rejected_ids``. KTO example: ``prompt_ids``,
    ``completion_ids``, ``label`` (bool). Completion ids end with the end-of-turn token (when the template has one).
    """

    task: str
    examples: list[dict[str, Any]] = field(default_factory=list)
    stats: DataStats = field(default_factory=DataStats)

    def __len__(self) -> int:
        return len(self.examples)


def build_preference_dataset(recipe, tokenizer, split: str = "train") -> PreferenceDataset:
    """Tokenized DPO/KTO examples of ``split``; an eval split that is not configured is empty."""
    task = recipe.task
    if task not in _FIELDS:
        raise ValueError(f"build_preference_dataset handles dpo/kto, not {task!r}")
    records = select_records(recipe, split)
    if not records:
        return PreferenceDataset(task)
    template = resolve_template(tokenizer, recipe.data.chat_template)
    seq_len, max_prompt = recipe.data.seq_len, recipe.preference.max_prompt_len
    stats = DataStats(records=len(records))
    examples = []
    for record in records:
        example, truncated = _tokenize_record(record, task, tokenizer, template, seq_len, max_prompt)
        if truncated:
            stats.note_truncated(record.where)
        if example is None:
            stats.note_dropped(record.where)
            continue
        examples.append(example)
        completions = [k for k in example if k.endswith("_ids") and k != "prompt_ids"]
        stats.tokens += sum(len(example["prompt_ids"]) + len(example[k]) for k in completions)
        stats.trained_tokens += sum(len(example[k]) for k in completions)
    if not examples:
        raise UserError(
            f"nothing left to train on in the {split} data: all {stats.records} examples were too long "
            f"(a prompt of {seq_len} tokens or more leaves no room for the completion at data.seq_len={seq_len})",
            where=records[0].path,
            fix=f"raise data.seq_len (e.g. --set data.seq_len={seq_len * 4}), or cap prompts with "
            f"preference.max_prompt_len (e.g. --set preference.max_prompt_len={max(1, seq_len // 2)})",
        )
    return PreferenceDataset(task, examples, stats)


# --------------------------------------------------------------------------- validation


def _tokenize_record(record: Record, task: str, tokenizer, template: str, seq_len: int, max_prompt: int | None):
    """(example or None when nothing fits, 1 if anything was truncated else 0)."""
    for key in _FIELDS[task]:
        if key not in record.data or record.data[key] is None:
            looks = record_format(record)
            other = f"; this record looks like {looks} data" if looks and looks != task else ""
            switch = f"set task: {looks} for such records, or " if looks in _FIELDS and looks != task else ""
            raise UserError(
                f"missing field {key!r} (this file is read as {task} data{other})",
                where=record.where,
                fix=f"{switch}add {key!r} to this record; every {task} record looks like {_EXAMPLES[task]}",
            )
    prompt = prompt_messages(record, task)
    names = ("chosen", "rejected") if task == "dpo" else ("completion",)
    texts = {name: _prompt_and_completion(record, task, name, prompt, tokenizer, template) for name in names}
    prompt_text = texts[names[0]][0]
    if any(t[0] != prompt_text for t in texts.values()):
        raise UserError("the chat template renders the prompt differently before 'chosen' and 'rejected'",
                        where=record.where, fix="choose a built-in template (data.chat_template: chatml)")
    prompt_ids = _encode(tokenizer, prompt_text)
    truncated = 0
    if max_prompt is not None and len(prompt_ids) > max_prompt:
        prompt_ids, truncated = prompt_ids[-max_prompt:], 1  # keep the end: it is what the completion answers
    budget = seq_len - len(prompt_ids)
    example: dict[str, Any] = {"prompt_ids": prompt_ids}
    for name, (_, completion_text) in texts.items():
        ids = _encode(tokenizer, completion_text)
        if len(ids) > budget:
            ids, truncated = ids[:max(budget, 0)], 1
        if not ids:
            return None, truncated
        example[f"{name}_ids"] = ids
    if task == "kto":
        example["label"] = _label(record)
    return example, truncated


def prompt_messages(record: Record, task: str) -> list[dict[str, str]]:
    """``prompt`` as chat messages: a string is one user turn; a list is validated message by message."""
    raw = record.data["prompt"]
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    messages = _messages(record, "prompt", raw, task)
    if messages[-1]["role"] == "assistant":
        raise UserError(
            "the prompt ends with an assistant message; the completion must follow a user turn",
            where=f"{record.where} (field 'prompt')",
            fix="end 'prompt' with the user message and put the assistant reply in the completion field(s)",
        )
    return messages


def completion_messages(record: Record, task: str, name: str) -> list[dict[str, str]]:
    """A completion field as assistant messages: a string, one message object, or a list of assistant messages."""
    raw = record.data[name]
    if isinstance(raw, str):
        return [{"role": "assistant", "content": raw}]
    messages = _messages(record, name, [raw] if isinstance(raw, dict) else raw, task)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise UserError(
                f"{name}[{i}] has role {message['role']!r}; '{name}' holds only the assistant reply",
                where=f"{record.where} (field '{name}')",
                fix="move the conversation before the reply into 'prompt' and keep only assistant messages here",
            )
    return messages


def _messages(record: Record, name: str, raw: Any, task: str) -> list[dict[str, str]]:
    where = f"{record.where} (field '{name}')"
    if not isinstance(raw, list) or not raw:
        raise UserError(
            f"'{name}' must be a string or a non-empty list of {{role, content}} messages, found {_kind(raw)}",
            where=where, fix=f"write e.g. {_EXAMPLES[task]}",
        )
    out = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise UserError(f"{name}[{i}] is {_kind(message)}, not a message object", where=where,
                            fix='write {"role": ..., "content": ...}')
        for key in ("role", "content"):
            if message.get(key) is None:
                raise UserError(f"missing field {key!r} in {name}[{i}]", where=where,
                                fix="every message needs 'role' and 'content'")
        if message["role"] not in ROLES:
            raise UserError(f"unknown role {message['role']!r} in {name}[{i}]", where=where,
                            fix=f"use one of {', '.join(ROLES)} (e.g. 'human' -> 'user', 'gpt'/'bot' -> 'assistant')")
        if not isinstance(message["content"], str):
            raise UserError(f"{name}[{i}].content must be a string, found {_kind(message['content'])}", where=where,
                            fix="write the content as plain text")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _label(record: Record) -> bool:
    value = record.data["label"]
    if not isinstance(value, bool):
        raise UserError(
            f"field 'label' must be a boolean (true = desirable, false = undesirable), found {_kind(value)} {value!r}",
            where=f"{record.where} (field 'label')",
            fix=f'write "label": true or "label": false (JSON booleans, no quotes), e.g. {KTO_EXAMPLE}',
        )
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


# --------------------------------------------------------------------------- rendering


def _prompt_and_completion(record: Record, task: str, name: str, prompt, tokenizer, template) -> tuple[str, str]:
    """(prompt text with generation prompt, completion text through its end-of-turn token) for one completion field.

    The completion's span comes from the SFT masking's ``assistant_spans`` on the whole conversation, so it is
    exactly what SFT would train: the reply's content plus the turn's closing special token.
    """
    completion = completion_messages(record, task, name)
    where = f"{record.where} (field '{name}')"
    try:
        full, spans = assistant_spans(tokenizer, template, prompt + completion, where=where)
    except UserError as exc:
        if exc.where == "data.chat_template":
            raise UserError(exc.what, where=where, fix=exc.fix) from None
        raise
    first = len(spans) - len(completion)  # the prompt may hold earlier assistant turns; the reply's spans are last
    start, end = spans[first][0], spans[-1][1]
    return full[:start], full[start:end]


def _encode(tokenizer, text: str) -> list[int]:
    # add_special_tokens=False: the template already wrote BOS where the model wants it (as the SFT masking does)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


# --------------------------------------------------------------------------- batching


def sequences(examples: list[dict[str, Any]], completion_key: str, prompts: list[list[int]] | None = None):
    """(input_ids, labels) rows of prompt + completion; ``prompts`` overrides the prompt of each row (KTO's KL pairs)."""
    rows = []
    for i, ex in enumerate(examples):
        prompt = ex["prompt_ids"] if prompts is None else prompts[i]
        completion = ex[completion_key]
        rows.append((prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
    return rows


def collate_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-pad (input_ids, labels) rows; labels are -100 on the prompt and on pads."""
    from onecard.data.collate import collate

    return collate([{"input_ids": ids, "labels": labels} for ids, labels in rows], pad_id)


def collate_dpo(examples: list[dict[str, Any]], pad_id: int) -> dict:
    """One batch of 2n rows, the n chosen sequences first, then the n rejected ones (trl's concatenated layout):
    policy and reference each run one forward over both."""
    return collate_rows(sequences(examples, "chosen_ids") + sequences(examples, "rejected_ids"), pad_id)


def collate_kto(examples: list[dict[str, Any]], pad_id: int) -> dict:
    import torch

    batch = collate_rows(sequences(examples, "completion_ids"), pad_id)
    batch["label"] = torch.tensor([bool(ex["label"]) for ex in examples], dtype=torch.bool)
    return batch


def kl_rows(examples: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    """Mismatched (prompt, completion) pairs for KTO's KL estimate: completions rotated by one,
    (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}) -- the pairing trl's KTOTrainer uses (kto_trainer.py, KL dataset)."""
    rotated = [examples[-1]] + examples[:-1]
    return sequences(rotated, "completion_ids", prompts=[ex["prompt_ids"] for ex in examples])
