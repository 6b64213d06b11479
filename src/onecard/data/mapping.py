"""``data.columns`` and ``data.roles``: other datasets' field and role names, renamed to onecard's as each record
is read, so the format checks, their file:line errors and the trainer see one layout.

``data.columns`` maps onecard's name to the source's (``{output: response, messages: dialog}``, the direction of
LLaMA-Factory's ``dataset_info.json`` ``columns``); ``role`` and ``content`` rename the keys inside each message.
``data.roles`` maps a source's role or ShareGPT speaker name to ``user``/``assistant``/``system``/``tool``.
"""

from __future__ import annotations

from dataclasses import replace

from onecard.data.records import Record
from onecard.errors import UserError

# onecard's field names that data.columns may point elsewhere; the first group must be present once mapped
REQUIRED_COLUMNS = ("messages", "instruction", "output", "text", "prompt", "chosen", "rejected", "completion", "label")
OPTIONAL_COLUMNS = ("input", "system", "role", "content")
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
MESSAGE_KEYS = ("role", "content")


def remap(record: Record, columns: dict[str, str], roles: dict[str, str]) -> Record:
    """``record`` with its fields and roles under onecard's names (the same record when both maps are empty)."""
    if not columns and not roles:
        return record
    data = dict(record.data)
    for name, source in columns.items():
        if name in MESSAGE_KEYS:
            continue
        if source in data:
            data[name] = data.pop(source)
        elif name in REQUIRED_COLUMNS and name not in data:
            raise UserError(f"missing field {source!r} (data.columns.{name} reads it)", where=record.where,
                            fix=f"add {source!r} to this record, or point data.columns.{name} at the field that holds it")
    key = "messages" if "messages" in data else "conversations"
    if isinstance(data.get(key), list):
        data[key] = [_message(m, columns, roles) if isinstance(m, dict) else m for m in data[key]]
    return replace(record, data=data)


def _message(message: dict, columns: dict[str, str], roles: dict[str, str]) -> dict:
    out = dict(message)
    for name in MESSAGE_KEYS:
        source = columns.get(name)
        if source and source in out:
            out[name] = out.pop(source)
    for key in ("role", "from"):  # chat role or ShareGPT speaker
        value = out.get(key)
        if isinstance(value, str) and value in roles:
            out[key] = roles[value]
    return out


def mapping_text(columns: dict[str, str], roles: dict[str, str]) -> str:
    """``, with output <- response, bot -> assistant`` for the detection notice; empty without a mapping."""
    parts = [f"{name} <- {source}" for name, source in columns.items()] + [f"{a} -> {b}" for a, b in roles.items()]
    return f", with {', '.join(parts)}" if parts else ""
