"""Record formats: chat ``messages``, alpaca, raw ``text``; detection and conversion to messages.

Detection looks at the keys of each record, so a file mixing formats is caught at the first
odd line rather than silently half-used.
"""

from __future__ import annotations

from typing import Any

from onecard.data.records import Record
from onecard.errors import UserError

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]

_FORMAT_KEYS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    "dpo": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
}
_EXAMPLES = {
    "chat": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "alpaca": '{"instruction": "...", "input": "(optional)", "output": "..."}',
    "text": '{"text": "..."}',
}


def record_format(record: Record) -> str | None:
    """The format a single record looks like, or None. Preference formats are checked first (``prompt`` keys)."""
    keys = record.data.keys()
    for name in ("dpo", "kto", "chat", "alpaca", "text"):
        if all(k in keys for k in _FORMAT_KEYS[name]):
            return name
    if "conversations" in keys:
        return "sharegpt"
    return None


def detect_format(records: list[Record], declared: str, task: str) -> str:
    """Resolve ``data.format`` (``auto`` looks at the first record) and check it fits the task."""
    fmt = declared
    if declared == "auto":
        fmt = record_format(records[0])
        if fmt is None:
            raise _unknown_format(records[0])
    if fmt == "sharegpt":
        raise UserError(
            "ShareGPT-style 'conversations' (from/value) is not read directly",
            where=records[0].where,
            fix='rename to "messages" with {"role": "user"|"assistant"|"system", "content": ...} items',
        )
    if fmt in ("dpo", "kto") and task not in ("dpo", "kto"):
        raise UserError(
            f"these records are preference data ({', '.join(_FORMAT_KEYS[fmt])}) but the recipe's task is {task!r}",
            where=records[0].where,
            fix=f"set task: {fmt} in the recipe to train on preference pairs, or give SFT data ({_EXAMPLES['chat']})",
        )
    if task == "pretrain" and fmt != "text":
        raise UserError(
            f"task 'pretrain' trains on raw text, but the records are {fmt!r}",
            where=records[0].where,
            fix=f"give records like {_EXAMPLES['text']}, or use task: sft for {fmt} data",
        )
    return fmt


def _unknown_format(record: Record) -> UserError:
    keys = ", ".join(sorted(record.data)) or "(none)"
    return UserError(
        f"unknown data format: the record's fields are {keys}",
        where=record.where,
        fix="use one of: chat " + _EXAMPLES["chat"] + "; alpaca " + _EXAMPLES["alpaca"] + "; text " + _EXAMPLES["text"],
    )


def to_messages(record: Record, fmt: str) -> Messages:
    """Convert one chat or alpaca record into a validated list of {role, content}."""
    if fmt == "chat":
        return _chat_messages(record)
    if fmt == "alpaca":
        return _alpaca_messages(record)
    raise ValueError(f"to_messages does not handle {fmt!r}")  # a bug in onecard, not user input


def record_text(record: Record) -> str:
    _require(record, "text", "text")
    value = record.data["text"]
    if not isinstance(value, str):
        raise UserError(f"field 'text' must be a string, found {type(value).__name__}", where=record.where, fix=f"write {_EXAMPLES['text']}")
    return value


def _require(record: Record, key: str, fmt: str) -> None:
    if key not in record.data or record.data[key] is None:
        raise UserError(
            f"missing field {key!r} (this file is read as {fmt} data)",
            where=record.where,
            fix=f"add {key!r} to this record; every {fmt} record looks like {_EXAMPLES[fmt]}",
        )


def _chat_messages(record: Record) -> Messages:
    _require(record, "messages", "chat")
    raw = record.data["messages"]
    if not isinstance(raw, list) or not raw:
        raise UserError("'messages' must be a non-empty list of {role, content} objects", where=record.where, fix=f"write {_EXAMPLES['chat']}")
    out: Messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise UserError(f"messages[{i}] is not an object", where=record.where, fix='write {"role": ..., "content": ...}')
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                raise UserError(f"missing field {key!r} in messages[{i}]", where=record.where, fix=f"every message needs 'role' and 'content', e.g. {_EXAMPLES['chat']}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise UserError(
                f"unknown role {role!r} in messages[{i}]",
                where=record.where,
                fix=f"use one of {', '.join(ROLES)} (e.g. 'human' -> 'user', 'gpt'/'bot' -> 'assistant')",
            )
        if not isinstance(content, str):
            raise UserError(f"messages[{i}].content must be a string, found {type(content).__name__}", where=record.where, fix="write the content as plain text")
        out.append({"role": role, "content": content})
    return out


def _alpaca_messages(record: Record) -> Messages:
    for key in ("instruction", "output"):
        _require(record, key, "alpaca")
    data: dict[str, Any] = record.data
    for key in ("instruction", "input", "output", "system"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise UserError(f"field {key!r} must be a string, found {type(data[key]).__name__}", where=record.where, fix=f"write {_EXAMPLES['alpaca']}")
    prompt = data["instruction"]
    if data.get("input"):
        prompt = f"{prompt}\n\n{data['input']}"
    messages: Messages = [{"role": "system", "content": data["system"]}] if data.get("system") else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": data["output"]}]
    return messages
