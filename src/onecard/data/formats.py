"""Record formats: chat ``messages`` (OpenAI, with tool turns), ShareGPT ``conversations``, alpaca, raw ``text``;
detection and conversion to messages.

Detection looks at the keys of each record (for a conversation, at its first message's keys), so a file mixing
formats is caught at the first odd line rather than silently half-used. Messages come out in the layout of
transformers' chat templates: ``{role, content}``, an assistant turn's ``tool_calls`` as
``[{"type": "function", "function": {"name", "arguments": dict}}]`` and the tool's answer as role ``tool``
(https://huggingface.co/docs/transformers/chat_extras#tools).
"""

from __future__ import annotations

import json
from typing import Any

from onecard.data.records import Record
from onecard.errors import UserError

ROLES = ("system", "user", "assistant")  # what preference data may hold
CHAT_ROLES = ROLES + ("tool",)
CONVERSATION_FORMATS = ("chat", "sharegpt", "alpaca")  # rendered through the chat template
Messages = list[dict[str, Any]]

_FORMAT_KEYS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    "dpo": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
}
_EXAMPLES = {
    "chat": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "sharegpt": '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}',
    "alpaca": '{"instruction": "...", "input": "(optional)", "output": "..."}',
    "text": '{"text": "..."}',
}
_TITLES = {"chat": "OpenAI chat", "sharegpt": "ShareGPT", "alpaca": "Alpaca", "text": "raw text", "dpo": "DPO pairs",
           "kto": "KTO feedback"}
# ShareGPT speakers as the hub's datasets write them (LLaMA-Factory's data/README.md: human, gpt, system,
# function_call, observation); ``tool`` as in Hermes/Glaive function-calling sets. ``data.roles`` adds others.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "observation": "tool", "tool": "tool", "function_call": "function_call"}


def conversation_key(data: dict[str, Any]) -> str | None:
    """The field holding the conversation: ``messages`` or ``conversations`` (ShareGPT's name)."""
    for key in ("messages", "conversations"):
        if key in data and data[key] is not None:
            return key
    return None


def record_format(record: Record) -> str | None:
    """The format a single record looks like, or None. Preference formats are checked first (``prompt`` keys)."""
    keys = record.data.keys()
    for name in ("dpo", "kto"):
        if all(k in keys for k in _FORMAT_KEYS[name]):
            return name
    key = conversation_key(record.data)
    if key is not None:
        turns = record.data[key]
        first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
        if "from" in first or "value" in first:
            return "sharegpt"
        return "chat" if key == "messages" or "role" in first else "sharegpt"
    for name in ("alpaca", "text"):
        if all(k in keys for k in _FORMAT_KEYS[name]):
            return name
    return None


def describe_format(fmt: str, record: Record) -> str:
    """``ShareGPT (conversations/from/value)``: the format and the fields it was recognised by."""
    key = conversation_key(record.data)
    fields = {"chat": f"{key}/role/content", "sharegpt": f"{key}/from/value",
              "alpaca": "instruction/input/output" if "input" in record.data else "instruction/output"}
    return f"{_TITLES.get(fmt, fmt)} ({fields.get(fmt) or '/'.join(_FORMAT_KEYS.get(fmt, (fmt,)))})"


def detect_format(records: list[Record], declared: str, task: str) -> str:
    """Resolve ``data.format`` (``auto`` looks at the first record) and check it fits the task."""
    fmt = declared
    if declared == "auto":
        fmt = record_format(records[0])
        if fmt is None:
            raise _unknown_format(records[0])
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
        fix="use one of: chat " + _EXAMPLES["chat"] + "; ShareGPT " + _EXAMPLES["sharegpt"] + "; alpaca "
        + _EXAMPLES["alpaca"] + "; text " + _EXAMPLES["text"] + " -- or name your fields with data.columns "
        "(e.g. data.columns: {output: response})",
    )


def to_messages(record: Record, fmt: str) -> Messages:
    """Convert one chat, ShareGPT or alpaca record into a validated list of messages."""
    if fmt == "chat":
        return _chat_messages(record)
    if fmt == "sharegpt":
        return _sharegpt_messages(record)
    if fmt == "alpaca":
        return _alpaca_messages(record)
    raise ValueError(f"to_messages does not handle {fmt!r}")  # a bug in onecard, not user input


def has_tool_turns(messages: Messages) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


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


def _turns(record: Record, fmt: str) -> list:
    key = conversation_key(record.data)
    if key is None:
        _require(record, "messages" if fmt == "chat" else "conversations", fmt)
    _refuse_tool_definitions(record)
    raw = record.data[key]
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{key!r} must be a non-empty list of messages", where=record.where, fix=f"write {_EXAMPLES[fmt]}")
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise UserError(f"{key}[{i}] is not an object", where=record.where, fix=f"write {_EXAMPLES[fmt]}")
    # Arrow sources give every message every key of the column's struct, absent ones as null
    return [{k: v for k, v in message.items() if v is not None} for message in raw]


def _refuse_tool_definitions(record: Record) -> None:
    if record.data.get("tools") or record.data.get("functions"):
        raise UserError(
            "tool definitions ('tools'/'functions') are not passed to the chat template, so the model would be "
            "trained on calls to tools it was never shown",
            where=record.where,
            fix="describe the tools in the system message and drop the 'tools' field (tool calls and tool "
                "answers in the conversation itself are read)",
        )


def _chat_messages(record: Record) -> Messages:
    out: Messages = []
    for i, message in enumerate(_turns(record, "chat")):
        for key in ("role", "content"):
            if key not in message and not (key == "content" and message.get("tool_calls")):
                raise UserError(f"missing field {key!r} in messages[{i}]", where=record.where,
                                fix=f"every message needs 'role' and 'content', e.g. {_EXAMPLES['chat']}")
        role = message["role"]
        if role not in CHAT_ROLES:
            raise UserError(
                f"unknown role {role!r} in messages[{i}]",
                where=record.where,
                fix=f"use one of {', '.join(CHAT_ROLES)} (e.g. 'human' -> 'user', 'gpt'/'bot' -> 'assistant'), or map "
                    f"the name with data.roles: {{{role}: user}}",
            )
        out.append(_message(record, f"messages[{i}]", role, message.get("content", ""), message))
    return out


def _sharegpt_messages(record: Record) -> Messages:
    out: Messages = []
    if isinstance(record.data.get("system"), str) and record.data["system"]:  # LLaMA-Factory's system column
        out.append({"role": "system", "content": record.data["system"]})
    key = conversation_key(record.data)
    for i, turn in enumerate(_turns(record, "sharegpt")):
        for field in ("from", "value"):
            if field not in turn:
                raise UserError(f"missing field {field!r} in {key}[{i}]", where=record.where,
                                fix=f"every ShareGPT turn needs 'from' and 'value', e.g. {_EXAMPLES['sharegpt']}")
        speaker = SHAREGPT_ROLES.get(turn["from"])
        if speaker is None:
            raise UserError(
                f"unknown speaker {turn['from']!r} in {key}[{i}]",
                where=record.where,
                fix=f"ShareGPT speakers are {', '.join(SHAREGPT_ROLES)}; map others with data.roles: "
                    f"{{{turn['from']}: assistant}}",
            )
        if speaker == "function_call":
            calls = _function_call(record, f"{key}[{i}]", turn["value"])
            if out and out[-1]["role"] == "assistant" and not out[-1].get("tool_calls"):
                out[-1]["tool_calls"] = calls  # gpt text then its call: one assistant turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        out.append(_message(record, f"{key}[{i}]", speaker, turn["value"], {}))
    return out


def _message(record: Record, at: str, role: str, content: Any, message: dict) -> dict[str, Any]:
    """One validated message; an assistant's ``tool_calls`` and a tool answer's id/name are kept."""
    if not isinstance(content, str):
        raise UserError(f"{at}.content must be a string, found {type(content).__name__}", where=record.where,
                        fix="write the content as plain text")
    out: dict[str, Any] = {"role": role, "content": content}
    if message.get("tool_calls"):
        if role != "assistant":
            raise UserError(f"{at} has 'tool_calls' but its role is {role!r}", where=record.where,
                            fix="only assistant messages call tools")
        out["tool_calls"] = [_tool_call(record, f"{at}.tool_calls[{j}]", call)
                             for j, call in enumerate(_as_list(record, at, message["tool_calls"]))]
    if role == "tool":
        out.update({k: message[k] for k in ("tool_call_id", "name") if isinstance(message.get(k), str)})
    return out


def _as_list(record: Record, at: str, value: Any) -> list:
    if not isinstance(value, list):
        raise UserError(f"{at}.tool_calls must be a list, found {type(value).__name__}", where=record.where,
                        fix='write "tool_calls": [{"type": "function", "function": {"name": ..., "arguments": {...}}}]')
    return value


def _function_call(record: Record, at: str, value: Any) -> list[dict[str, Any]]:
    """A ShareGPT ``function_call`` turn: its value is the call as JSON text (one object or a list)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise UserError(f"{at} (function_call) is not JSON: {exc.msg}", where=record.where,
                            fix='write the value as {"name": "tool_name", "arguments": {...}}') from None
    calls = value if isinstance(value, list) else [value]
    return [_tool_call(record, at, call) for call in calls]


def _tool_call(record: Record, at: str, call: Any) -> dict[str, Any]:
    """OpenAI's ``{"type": "function", "function": {name, arguments: JSON text}}`` or a bare ``{name, arguments}``,
    with the arguments parsed to a dict (what transformers' templates expect: they ``tojson`` them)."""
    body = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise UserError(f"{at} is not a tool call with a 'name'", where=record.where,
                        fix='write {"type": "function", "function": {"name": "tool_name", "arguments": {...}}}')
    arguments = body.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise UserError(f"{at}: the arguments are not JSON ({exc.msg})", where=record.where,
                            fix='write the arguments as a JSON object, e.g. "{\\"city\\": \\"Paris\\"}"') from None
    if not isinstance(arguments, dict):
        raise UserError(f"{at}: the arguments must be an object, found {type(arguments).__name__}",
                        where=record.where, fix='write "arguments": {"name": value, ...}')
    out: dict[str, Any] = {"type": "function", "function": {"name": body["name"], "arguments": arguments}}
    if isinstance(call, dict) and isinstance(call.get("id"), str):
        out["id"] = call["id"]
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
