"""A renderer for the subset of Go's ``text/template`` that onecard's Ollama templates use, and Ollama's inputs.

Why hand-written: Ollama renders prompts with Go's ``text/template``; no maintained Python implementation of it
exists (the one registry package, a CGo wrapper at 0.0.2, needs a Go toolchain), and onecard only has to check
the few templates it emits itself (``ollama.OLLAMA_TEMPLATES``) against the Jinja template they translate.
So this implements exactly what those use, and raises on anything else rather than guess:
text; ``{{- ... -}}`` whitespace trimming; ``{{ pipeline }}`` output; ``if`` / ``else if`` / ``else`` / ``end``;
``range $i, $_ := pipeline``; ``$var := pipeline``; fields ``.Name`` and ``$.Name``; variables; string
and integer literals; parentheses; the functions ``eq ne and or not len slice``.

``ollama_prompt`` builds the data the way Ollama's server does (ollama/ollama ``server/routes.go`` prepends the
Modelfile's SYSTEM when a chat has no system message; ``template/template.go`` ``collate``: ``.System`` is every
system message joined by a blank line, and consecutive messages of one role are merged the same way).
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|\$\.\w+|\$\w*|\.\w+|\w+)')
_SPACE = " \t\r\n"


class TemplateError(ValueError):
    """A construct outside the supported subset, or malformed template text."""


def render(template: str, data: dict[str, Any]) -> str:
    nodes, rest = _parse(_lex(template), ())
    if rest:
        raise TemplateError(f"unexpected {{{{ {rest[0][1]} }}}}")
    out: list[str] = []
    _run(nodes, data, {"$": data}, out)
    return "".join(out)


def ollama_prompt(template: str, messages: list[dict[str, str]], system: str | None = None) -> str:
    """The prompt Ollama sends to the model for a chat of ``messages`` (role/content dicts)."""
    msgs = [dict(m) for m in messages]
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    collated: list[dict[str, str]] = []
    for m in msgs:
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    joined = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    return render(template, {"System": joined, "Messages": collated, "Tools": None, "Prompt": "", "Response": ""})


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)] with the trim markers applied to the neighbouring text."""
    items: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for match in _ACTION.finditer(template):
        text = template[pos:match.start()]
        if trim_next:
            text = text.lstrip(_SPACE)
        if match.group(1):
            text = text.rstrip(_SPACE)
        if text:
            items.append(("text", text))
        items.append(("action", match.group(2).strip()))
        pos, trim_next = match.end(), bool(match.group(3))
    tail = template[pos:]
    if trim_next:
        tail = tail.lstrip(_SPACE)
    if "{{" in tail:
        raise TemplateError("unclosed {{")
    if tail:
        items.append(("text", tail))
    return items


def _parse(items, stop: tuple[str, ...]):
    """Nodes until an action whose first word is in ``stop``; returns (nodes, remaining items)."""
    nodes: list[tuple] = []
    while items:
        kind, body = items[0]
        if kind == "text":
            nodes.append(("text", body))
            items = items[1:]
            continue
        word = body.split(None, 1)[0] if body else ""
        if word in stop:
            return nodes, items
        items = items[1:]
        if word == "if":
            branches, otherwise = [], []
            cond = _tokens(body[2:])
            while True:
                block, items = _parse(items, ("else", "end"))
                branches.append((cond, block))
                if not items:
                    raise TemplateError("if without end")
                _, end_body = items[0]
                items = items[1:]
                if end_body == "end":
                    break
                if end_body.startswith("else if "):
                    cond = _tokens(end_body[len("else if "):])
                    continue
                if end_body != "else":
                    raise TemplateError(f"unsupported {{{{ {end_body} }}}}")
                otherwise, items = _parse(items, ("end",))
                if not items:
                    raise TemplateError("else without end")
                items = items[1:]
                break
            nodes.append(("if", branches, otherwise))
        elif word == "range":
            m = re.fullmatch(r"range\s+(\$\w+),\s*(\$\w*)\s*:=\s*(.+)", body, re.DOTALL)
            if not m:
                raise TemplateError(f"unsupported {{{{ {body} }}}} (only range $i, $v := ...)")
            block, items = _parse(items, ("end",))
            if not items:
                raise TemplateError("range without end")
            items = items[1:]
            nodes.append(("range", m.group(1), m.group(2), _tokens(m.group(3)), block))
        elif re.match(r"\$\w+\s*:=", body):
            name, expr = body.split(":=", 1)
            nodes.append(("set", name.strip(), _tokens(expr)))
        elif word in ("else", "end", "with", "define", "template", "block", "break", "continue"):
            raise TemplateError(f"unsupported or misplaced {{{{ {body} }}}}")
        else:
            nodes.append(("print", _tokens(body)))
    return nodes, items


def _tokens(expr: str) -> list[str]:
    tokens, pos, expr = [], 0, expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or not m.group(1):
            raise TemplateError(f"cannot read {expr[pos:]!r}")
        tokens.append(m.group(1))
        pos = m.end()
    return tokens


def _run(nodes, dot, scope: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            value = _eval(node[1], dot, scope)
            out.append("" if value is None else str(value))
        elif node[0] == "set":
            scope[node[1]] = _eval(node[2], dot, scope)
        elif node[0] == "if":
            for cond, block in node[1]:
                if _truth(_eval(cond, dot, scope)):
                    _run(block, dot, dict(scope), out)
                    break
            else:
                _run(node[2], dot, dict(scope), out)
        else:  # range
            _, index_var, value_var, expr, block = node
            for i, item in enumerate(_eval(expr, dot, scope) or []):
                _run(block, item, {**scope, index_var: i, **({value_var: item} if value_var != "$_" else {})}, out)


def _eval(tokens: list[str], dot, scope):
    value, rest = _call(tokens, dot, scope)
    if rest:
        raise TemplateError(f"unexpected {' '.join(rest)}")
    return value


def _call(tokens, dot, scope):
    """One pipeline without ``|``: a function applied to arguments, or a single operand."""
    funcs = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not _truth(a),
             "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]),
             "or": lambda *a: next((x for x in a if _truth(x)), a[-1]),
             "len": len, "slice": lambda x, i: x[i:]}
    if tokens and tokens[0] in funcs:
        args, rest = [], tokens[1:]
        while rest and rest[0] != ")":
            arg, rest = _operand(rest, dot, scope)
            args.append(arg)
        return funcs[tokens[0]](*args), rest
    return _operand(tokens, dot, scope)


def _operand(tokens, dot, scope):
    tok, rest = tokens[0], tokens[1:]
    if tok == "(":
        value, rest = _call(rest, dot, scope)
        if not rest or rest[0] != ")":
            raise TemplateError("missing )")
        return value, rest[1:]
    if tok.isdigit():
        return int(tok), rest
    if tok.startswith('"'):
        return bytes(tok[1:-1], "utf-8").decode("unicode_escape"), rest
    if tok.startswith("$."):
        return scope["$"][tok[2:]], rest
    if tok.startswith("$"):
        if tok not in scope:
            raise TemplateError(f"undefined variable {tok}")
        return scope[tok], rest
    if tok.startswith("."):
        return dot[tok[1:]], rest
    raise TemplateError(f"unsupported {tok!r}")


def _truth(value) -> bool:
    return bool(value)
