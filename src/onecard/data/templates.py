"""Chat templates: the tokenizer's own, or a named built-in, rendered through transformers.

Rendering goes through ``tokenizer.apply_chat_template`` (transformers' sandboxed jinja with its
helpers such as ``raise_exception``) so training sees exactly the text that inference will build.
The built-ins are copies of the published templates, cited per entry.
"""

from __future__ import annotations

from onecard.errors import UserError

# ChatML as used by Qwen2 / SmolLM2 (tokenizer_config.json of Qwen/Qwen2-0.5B-Instruct, without the default system prompt).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3 (tokenizer_config.json of meta-llama/Meta-Llama-3-8B-Instruct).
LLAMA_3 = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Alpaca prompt (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), multi-turn by repetition; the
# response ends with the EOS token so the tuned model learns to stop.
ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"chatml": CHATML, "llama-3": LLAMA_3, "alpaca": ALPACA}

# Special tokens each built-in needs in the vocabulary to render as single tokens.
TEMPLATE_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama-3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "alpaca": (),
}


def resolve_template(tokenizer, name: str = "auto") -> str:
    """The jinja string to use: ``auto`` = the tokenizer's own if it has one, else ChatML."""
    if name == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if own:
            return own
        name = "chatml"
    if name not in BUILTIN_TEMPLATES:
        raise UserError(f"unknown chat template {name!r}", where="data.chat_template", fix=f"use auto or one of {', '.join(BUILTIN_TEMPLATES)}")
    _check_vocab(tokenizer, name)
    return BUILTIN_TEMPLATES[name]


def _check_vocab(tokenizer, name: str) -> None:
    vocab = tokenizer.get_vocab()
    missing = [t for t in TEMPLATE_TOKENS[name] if t not in vocab]
    if missing:
        raise UserError(
            f"chat template {name!r} needs special tokens the tokenizer lacks: {', '.join(missing)}",
            where="data.chat_template",
            fix="use data.chat_template: auto (the model's own template), or a built-in whose tokens this model has",
        )


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render ``messages`` with ``template``; template errors (e.g. 'system role not supported') become UserError."""
    try:
        variables = _direct_variables(tokenizer) if messages and _DIRECT["on"] else None
        if variables is not None:
            return _compiled(template).render(messages=messages, tools=None, documents=None,
                                              add_generation_prompt=add_generation_prompt, **variables)
        return _apply(tokenizer, template, messages, add_generation_prompt)
    except Exception as exc:  # jinja TemplateError / raise_exception from inside the template
        raise UserError(
            f"the chat template refused this conversation: {exc}",
            where="data.chat_template",
            fix="check the roles (some templates reject 'system' or need user/assistant to alternate), or choose another data.chat_template",
        ) from None


# Rendering the compiled template directly with the variables ``apply_chat_template`` hands it (transformers 5.24:
# the special tokens map, tools=None, documents=None) skips its per-call normalisation of message objects, which
# plain {role, content} string messages do not need: 42 vs 95 us a render on SmolLM2's template (2,000 renders,
# this machine), and masking renders each conversation 1 + 2 x (assistant turns) times. ``check_direct_render``
# compares the two on real conversations and turns the direct path off, saying so, if they ever differ.
_DIRECT = {"on": True}


def _apply(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _compiled(template: str):
    from transformers.utils.chat_template_utils import _compile_jinja_template  # cached by transformers

    return _compile_jinja_template(template)


def _direct_variables(tokenizer) -> dict | None:
    """The special tokens map if it holds only plain strings (what transformers passes through unchanged)."""
    variables = tokenizer.special_tokens_map
    for value in variables.values():
        if type(value) is not str and not (type(value) is list and all(type(v) is str for v in value)):
            return None
    return variables


def check_direct_render(tokenizer, template: str, messages: list[dict]) -> None:
    """Turn the direct path off (for this process, with one line on stderr) if it renders ``messages``
    differently from ``apply_chat_template``, with and without a generation prompt."""
    if not (_DIRECT["on"] and messages and _direct_variables(tokenizer) is not None):
        return
    for prompt in (False, True):
        try:
            direct = render(tokenizer, template, messages, prompt)
            reference = _apply(tokenizer, template, messages, prompt)
        except Exception:  # noqa: BLE001 - a refusal is reported where the record is tokenised
            return
        if direct != reference:
            _DIRECT["on"] = False
            import sys

            print("onecard: direct chat-template rendering differs from apply_chat_template here; "
                  "using apply_chat_template (slower)", file=sys.stderr)
            return


def end_of_turn_tokens(tokenizer) -> list[str]:
    """Special-token strings that can close an assistant turn (``<|im_end|>``, ``<|eot_id|>``, ``</s>``...)."""
    tokens = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    tokens.update(t for t in getattr(tokenizer, "all_special_tokens", []) if t)
    if tokenizer.eos_token:
        tokens.add(tokenizer.eos_token)
    return sorted(tokens, key=len, reverse=True)
