"""The Modelfile's template, rendered the way Ollama renders it, equals the Jinja chat template's prompt.

The Go side runs through ``onecard.export.gotemplate`` (the subset of Go's text/template the emitted templates
use, with Ollama's system-prompt insertion and message collation); the Jinja side through transformers'
``apply_chat_template``. The Jinja templates are the published ones (cited per entry), not onecard's
translations, so a wrong translation fails here.
"""

from __future__ import annotations

import re

import pytest

from onecard.data.templates import ALPACA, CHATML, LLAMA_3

# google/gemma-2-2b-it tokenizer_config.json
GEMMA_2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
           "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
           "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
# mistralai/Mistral-7B-Instruct-v0.2 (as quoted in llama.cpp's tests/test-chat-template.cpp)
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] "
           "== 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
           "roles are supported!') }}{% endif %}{% endfor %}")
# microsoft/Phi-3-mini-4k-instruct tokenizer_config.json
PHI_3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
         "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
         "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
# HuggingFaceTB/SmolLM2-135M-Instruct tokenizer_config.json: ChatML with a default system prompt
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATION = [  # three user turns, two replies, a system message: the acceptance case
    {"role": "system", "content": "You are terse. Answer with one word."},
    {"role": "user", "content": "Colour of the sky?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Colour of grass?"},
    {"role": "assistant", "content": "Green."},
    {"role": "user", "content": "And snow?"},
]


def _tokenizer(template: str, adds_bos: bool = False):
    from tokenizers import processors

    from onecard.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(chat_template=template)
    tok.bos_token = "<|endoftext|>"
    if adds_bos:  # as Llama 3 and Gemma tokenizers do: BOS comes from the tokenizer, not the Ollama template
        bos = tok.convert_tokens_to_ids("<|endoftext|>")
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos)])
    return tok


class _Recipe:
    name = "tuned"

    class data:  # noqa: N801 - mirrors recipe.data
        chat_template = "auto"


def _modelfile(tmp_path, tokenizer):
    from onecard.export.ollama import write_modelfile

    path, notes = write_modelfile(tmp_path, "tuned-q8_0.gguf", tokenizer, _Recipe)
    text = path.read_text(encoding="utf-8")
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    return text, (template.group(1) if template else None), (system.group(1) if system else None), stops, notes


@pytest.mark.parametrize("template,adds_bos,family", [
    (CHATML, False, "chatml"), (SMOLLM2, False, "chatml"), (LLAMA_3, True, "llama-3"), (PHI_3, False, "phi-3")])
def test_modelfile_prompt_equals_jinja_with_system(tmp_path, template, adds_bos, family):
    from onecard.export.gotemplate import ollama_prompt
    from onecard.export.ollama import jinja_prompt

    tok = _tokenizer(template, adds_bos)
    text, go, system, stops, notes = _modelfile(tmp_path, tok)
    assert text.splitlines()[1] == "FROM ./tuned-q8_0.gguf" and family in notes[0]
    assert ollama_prompt(go, CONVERSATION, system=system) == jinja_prompt(tok, template, CONVERSATION)
    # no system message in the chat: Ollama inserts SYSTEM exactly where the Jinja template puts its default
    assert ollama_prompt(go, CONVERSATION[1:], system=system) == jinja_prompt(tok, template, CONVERSATION[1:])
    assert stops and stops[0] in go  # the end-of-turn marker the template writes is a stop string


def test_default_system_prompt_becomes_system(tmp_path):
    _, _, system, _, notes = _modelfile(tmp_path, _tokenizer(SMOLLM2))
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert "default system prompt" in notes[0]
    _, _, system, _, _ = _modelfile(tmp_path, _tokenizer(CHATML))
    assert system is None


@pytest.mark.parametrize("template,family,stop", [(GEMMA_2, "gemma", "<end_of_turn>"), (MISTRAL, "mistral", "[INST]")])
def test_templates_without_system_role(tmp_path, template, family, stop):
    """Gemma 2 and Mistral v0.2 refuse a system message; the 3-turn chat without one still renders the same."""
    from onecard.export.gotemplate import ollama_prompt
    from onecard.export.ollama import jinja_prompt

    tok = _tokenizer(template, adds_bos=True)
    tok.add_special_tokens({"eos_token": "</s>"})  # Mistral's EOS, which its template writes after each reply
    _, go, system, stops, notes = _modelfile(tmp_path, tok)
    assert family in notes[0] and system is None and stop in stops
    assert ollama_prompt(go, CONVERSATION[1:]) == jinja_prompt(tok, template, CONVERSATION[1:])


def test_unknown_template_is_not_guessed(tmp_path):
    text, go, _, stops, notes = _modelfile(tmp_path, _tokenizer(ALPACA))
    assert go is None and "no TEMPLATE" in text and "matches none" in notes[0]
    assert stops == ["<|im_end|>"]  # the tokenizer's EOS still stops generation


def test_bos_kept_when_the_tokenizer_does_not_add_it(tmp_path):
    """A template that writes BOS for a tokenizer that does not add it cannot be matched by dropping BOS."""
    _, go, _, _, _ = _modelfile(tmp_path, _tokenizer(LLAMA_3, adds_bos=False))
    assert go is None


def test_go_subset_renderer():
    from onecard.export.gotemplate import TemplateError, ollama_prompt, render

    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}], "System": ""}
    tpl = '{{- range $i, $_ := .Messages }}\n  {{- if eq .Role "user" }}U:{{ .Content }}{{ else if eq .Role "x" }}X' \
          '{{ else }}A:{{ .Content }}{{ end -}}\n  |{{ len (slice $.Messages $i) }}\n{{- end }}'
    assert render(tpl, data) == "U:a|2A:b|1"
    assert render("{{ if and .System (not .Messages) }}y{{ else }}n{{ end }}", data) == "n"
    with pytest.raises(TemplateError):
        render("{{ range .Messages }}{{ end }}", data)  # only the range form the emitted templates use
    with pytest.raises(TemplateError):
        render("{{ .Content | printf }}", data)
    # Ollama merges consecutive same-role messages and joins system messages into .System
    merged = ollama_prompt("{{ .System }}|{{ range $i, $_ := .Messages }}{{ .Role }}={{ .Content }};{{ end }}",
                           [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], system="S")
    assert merged == "S|system=S;user=x\n\ny;"
