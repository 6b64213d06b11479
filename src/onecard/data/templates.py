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

# Mistral v3 (Mistral-7B-Instruct-v0.3, Mixtral-8x22B, Codestral) and Tekken (Mistral-Nemo, Pixtral): the Jinja
# templates of mistralai/cookbook concept-deep-dive/tokenization/chat_templates.md ("Tokenizer V3", "Tekken Instruct
# Chat Template"). Tekken drops the spaces sentencepiece needed. Both refuse a system message, as the cookbook's do.
MISTRAL_V3 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_TEKKEN = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST]' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Qwen2 (tokenizer_config.json of Qwen/Qwen2-1.5B-Instruct): ChatML with a default system prompt.
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2.5 with tool calls (unsloth/chat_templates.py qwen25_template, Unsloth's copy of Qwen/Qwen2.5-*-Instruct's
# tokenizer_config.json, with its {system_message} set to Qwen's default as the original has it). Renders an
# assistant turn's tool_calls as <tool_call> JSON and role-tool answers as <tool_response> user turns.
QWEN2_5 = (
    '{%- if tools %}\n'
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    '    {%- else %}\n'
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    '    {%- endif %}\n'
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n'
    '    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    '{%- else %}\n'
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    '    {%- else %}\n'
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- for message in messages %}\n'
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    '        {%- if message.content %}\n'
    "            {{- '\\n' + message.content }}\n"
    '        {%- endif %}\n'
    '        {%- for tool_call in message.tool_calls %}\n'
    '            {%- if tool_call.function is defined %}\n'
    '                {%- set tool_call = tool_call.function %}\n'
    '            {%- endif %}\n'
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    '            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n'
    '            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n"
    '        {%- endfor %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}            {{- \'<|im_start|>user\' }}\n'
    '        {%- endif %}\n'
    "        {{- '\\n<tool_response>\\n' }}\n"
    '        {{- message.content }}\n'
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    '        {%- endif %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '{%- endif %}\n'
)

# Gemma 2 (tokenizer_config.json of google/gemma-2-9b-it and gemma-2-2b-it): refuses a system message.
GEMMA_2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Phi-3 (tokenizer_config.json of microsoft/Phi-3-mini-4k-instruct): <|end|> closes each turn (the model's
# generation_config lists it as an EOS id); the rendering ends with eos_token when no generation prompt follows.
PHI_3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

BUILTIN_TEMPLATES = {"chatml": CHATML, "llama-3": LLAMA_3, "mistral-v3": MISTRAL_V3, "mistral-tekken": MISTRAL_TEKKEN,
                     "qwen2": QWEN2, "qwen2.5": QWEN2_5, "gemma-2": GEMMA_2, "phi-3": PHI_3, "alpaca": ALPACA}

# Special tokens each built-in needs in the vocabulary to render as single tokens.
TEMPLATE_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama-3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral-v3": ("[INST]", "[/INST]"),
    "mistral-tekken": ("[INST]", "[/INST]"),
    "qwen2": ("<|im_start|>", "<|im_end|>"),
    "qwen2.5": ("<|im_start|>", "<|im_end|>"),
    "gemma-2": ("<start_of_turn>", "<end_of_turn>"),
    "phi-3": ("<|user|>", "<|assistant|>", "<|end|>"),
    "alpaca": (),
}
# The token that closes an assistant turn under each built-in, trained with the turn (None: the tokenizer's EOS).
STOP_TOKENS = {"chatml": "<|im_end|>", "llama-3": "<|eot_id|>", "mistral-v3": None, "mistral-tekken": None,
               "qwen2": "<|im_end|>", "qwen2.5": "<|im_end|>", "gemma-2": "<end_of_turn>", "phi-3": "<|end|>",
               "alpaca": None}


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
    missing += [f"a {kind} token" for kind in ("bos", "eos")
                if f"{kind}_token" in BUILTIN_TEMPLATES[name] and getattr(tokenizer, f"{kind}_token") is None]
    if missing:
        raise UserError(
            f"chat template {name!r} needs special tokens the tokenizer lacks: {', '.join(missing)}",
            where="data.chat_template",
            fix="use data.chat_template: auto (the model's own template), or a built-in whose tokens this model has",
        )


# A conversation with one tool call and its answer: a template renders tool turns when both names show.
_TOOL_PROBE = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather_probe", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny_probe_answer"},
    {"role": "assistant", "content": "Sunny."},
]


def renders_tool_turns(tokenizer, template: str) -> bool:
    """True when ``template`` shows an assistant's tool call and the tool's answer (ChatML, say, drops the call)."""
    try:
        text = render(tokenizer, template, _TOOL_PROBE)
    except UserError:
        return False
    return "get_weather_probe" in text and '"Paris"' in text and "sunny_probe_answer" in text


def require_tool_turns(tokenizer, template: str, name: str, where: str) -> None:
    """Refuse, at the first record that has them, tool turns the chat template would drop or reject."""
    if not renders_tool_turns(tokenizer, template):
        which = "the tokenizer's own chat template" if name == "auto" else f"chat template {name!r}"
        raise UserError(
            f"this conversation has tool calls or tool answers, but {which} does not render them",
            where=where,
            fix="use a model whose template renders tools, or data.chat_template: qwen2.5 (it does, in Qwen's "
                "<tool_call> format); or drop the tool turns from the data",
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
