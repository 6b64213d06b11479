"""A recipe's validation error as one UserError: the field's path, what is wrong, how to fix it, and where it was
set -- the ``--set`` that set it, else the recipe file's line (onecard.recipe validates; this explains)."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import yaml
from pydantic import BaseModel, ValidationError

from onecard.errors import UserError


def validation_error(exc: ValidationError, schema: type[BaseModel], source: Path | None, text: str | None,
                     overrides: list[str]) -> UserError:
    """The first of pydantic's errors; ``schema`` is the recipe's model, for the fields a misspelt one could be."""
    first = exc.errors()[0]
    loc = tuple(p for p in first["loc"] if not str(p).startswith("function-"))
    field = ".".join(str(p) for p in loc) or "recipe"
    what, fix = _explain(first)
    if first.get("type") == "extra_forbidden":
        fix = _did_you_mean(loc, schema)
    where = _override_for(loc, overrides)
    if where is None:
        line = _yaml_line(text, loc)
        where = f"{source}:{line}" if source and line else (str(source) if source else None)
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return UserError(f"{field}: {what}{more}", where=where, fix=fix)


def _yaml_line(text: str | None, loc: tuple) -> int | None:
    """Line (1-based) of the YAML key at ``loc``, or of its deepest existing parent."""
    if text is None:
        return None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    line, node = key_node.start_mark.line + 1, value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _explain(err: dict) -> tuple[str, str | None]:
    kind, ctx = err.get("type", ""), err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown field", None
    if kind == "literal_error":
        return f"invalid value {err.get('input')!r}", f"use one of {ctx.get('expected')}"
    if kind == "value_error":  # the validator's own sentence says what is allowed
        return str(err.get("msg", "invalid")).removeprefix("Value error, "), None
    if kind == "missing":
        return "required field is missing", "add it to the recipe"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{err.get('msg', 'out of range')} (got {err.get('input')!r})", "change the value to lie in that range"
    return f"{err.get('msg', 'invalid')} (got {err.get('input')!r})", None


def _override_for(loc: tuple, overrides: list[str]) -> str | None:
    """``--set a.b=v`` when the last override touching field ``loc`` (or a section above or below it) set it."""
    path = [str(p) for p in loc]
    for assignment in reversed(overrides):
        key = [p for p in assignment.split("=", 1)[0].strip().split(".") if p]
        n = min(len(key), len(path))
        if n and key[:n] == path[:n]:
            return f"--set {assignment}"
    return None


def _did_you_mean(loc: tuple, schema: type[BaseModel]) -> str:
    import difflib

    model = schema
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        section = next((a for a in (annotation, *get_args(annotation))  # a section or an optional one
                        if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if section is None:
            break
        model = section
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}allowed fields here: {', '.join(allowed)}"
