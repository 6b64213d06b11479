"""An Ollama ``Modelfile`` beside the GGUF: FROM, the chat template in Go-template syntax, stop tokens, SYSTEM.

The template the model was trained with (``data.chat_template`` resolved as training did) is matched against
the known families in ``OLLAMA_TEMPLATES`` by rendering, not by name: a family is chosen only when its Go
template, run the way Ollama runs it (``gotemplate.ollama_prompt``), renders the same text as the Jinja
template for a probe conversation -- a system message and three user turns with two replies, and the same
without the system message. A default system prompt the Jinja template adds when none is given (SmolLM2,
Qwen2.5) becomes the Modelfile's SYSTEM, which Ollama inserts in the same case. A leading BOS token is left to
llama.cpp's tokenizer, which adds it. A template no family reproduces is not guessed: the Modelfile then has no
TEMPLATE (Ollama falls back to its own choice) and the export notes say so.

The Go templates follow the shape of Ollama's library templates (``range $i, $_ := .Messages`` with a
``$last`` test for the generation prompt); tool calls are not translated.
"""

from __future__ import annotations

from pathlib import Path

from onecard.export.gotemplate import TemplateError, ollama_prompt

_RANGE = '{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n'
_GEN = '{{ if and $last (ne .Role "assistant") }}'

OLLAMA_TEMPLATES = {
    "chatml": (_RANGE + "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
               + _GEN + "<|im_start|>assistant\n{{ end }}\n{{- end }}"),
    "llama-3": (_RANGE + "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
                "{{- if and $last (ne .Role \"assistant\") }}<|start_header_id|>assistant<|end_header_id|>\n\n"
                "{{ end }}\n{{- end }}"),
    "gemma": (_RANGE + '{{- if eq .Role "assistant" }}<start_of_turn>model\n{{- else }}<start_of_turn>{{ .Role }}\n'
              "{{- end }}\n{{ .Content }}<end_of_turn>\n" + _GEN + "<start_of_turn>model\n{{ end }}\n{{- end }}"),
    "phi-3": (_RANGE + "<|{{ .Role }}|>\n{{ .Content }}<|end|>\n" + _GEN + "<|assistant|>\n{{ end }}\n{{- end }}"),
    "mistral": ('{{- range $i, $_ := .Messages }}\n{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]\n'
                '{{- else if eq .Role "assistant" }}{{ .Content }}</s>\n{{- end }}\n{{- end }}'),
}
# Strings that end an assistant turn in each family (Ollama's library Modelfiles stop on the same ones).
STOP_TOKENS = {
    "chatml": ("<|im_end|>", "<|im_start|>"),
    "llama-3": ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    "gemma": ("<end_of_turn>", "<start_of_turn>"),
    "phi-3": ("<|end|>", "<|user|>", "<|assistant|>"),
    "mistral": ("</s>", "[INST]", "[/INST]"),
}

PROBE = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome is the capital of Italy."},
    {"role": "user", "content": "Thanks. Which is larger?"},
]
_SENTINEL = "\x00onecard-system\x00"


def jinja_prompt(tokenizer, template: str, messages: list[dict]) -> str:
    """The Jinja template's generation prompt, without the BOS text when the tokenizer adds BOS itself (then so
    does llama.cpp's, from the add_bos_token the GGUF carries, and Ollama's template must not repeat it)."""
    from onecard.data.templates import render

    text = render(tokenizer, template, messages, add_generation_prompt=True)
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    adds_bos = bos_id is not None and tokenizer("x")["input_ids"][:1] == [bos_id]
    return text[len(bos):] if adds_bos and text.startswith(bos) else text


def translate(tokenizer, template: str) -> tuple[str, str | None, bool] | None:
    """(family, default system prompt or None, whether system messages work) for the first family that
    reproduces ``template`` on the probe conversations; None when none does."""
    try:
        with_system = jinja_prompt(tokenizer, template, PROBE)
    except Exception:  # templates that refuse a system role (Gemma's raise_exception)
        with_system = None
    without_system = jinja_prompt(tokenizer, template, PROBE[1:])
    for family, go in OLLAMA_TEMPLATES.items():
        try:
            if with_system is not None and ollama_prompt(go, PROBE) != with_system:
                continue
            default = _default_system(go, without_system)
        except (TemplateError, KeyError):
            continue
        if default is not False:
            return family, default, with_system is not None
    return None


def _default_system(go: str, expected: str) -> str | None | bool:
    """None if the family renders ``expected`` with no system message; the system text Ollama would need to
    insert to render it; False if neither."""
    if ollama_prompt(go, PROBE[1:]) == expected:
        return None
    head, sep, tail = ollama_prompt(go, PROBE[1:], system=_SENTINEL).partition(_SENTINEL)
    if sep and expected.startswith(head) and expected.endswith(tail) and len(expected) > len(head) + len(tail):
        system = expected[len(head):len(expected) - len(tail)]
        if ollama_prompt(go, PROBE[1:], system=system) == expected:
            return system
    return False


def write_modelfile(out: Path, gguf_name: str, tokenizer, recipe) -> tuple[Path, list[str]]:
    """Write ``out/Modelfile``; returns its path and notes for the export summary."""
    from onecard.data.templates import resolve_template

    template = resolve_template(tokenizer, recipe.data.chat_template)
    found = translate(tokenizer, template)
    lines = [f"# Ollama Modelfile written by onecard: ollama create {recipe.name} -f Modelfile", f"FROM ./{gguf_name}"]
    if found is None:
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
        notes = ["Modelfile: the chat template matches none of chatml, llama-3, gemma, phi-3, mistral when rendered; "
                 "it has no TEMPLATE, so Ollama will pick one itself -- check `ollama show --template` before use"]
        lines.append("# no TEMPLATE: onecard could not translate this chat template into Ollama's syntax")
    else:
        family, system, _ = found
        stops = list(STOP_TOKENS[family])
        if tokenizer.eos_token and tokenizer.eos_token not in stops:
            stops.append(tokenizer.eos_token)
        lines.append(f'TEMPLATE """{_quoted(OLLAMA_TEMPLATES[family])}"""')
        if system:
            lines.append(f'SYSTEM """{_quoted(system)}"""')
        notes = [f"Modelfile: {family} template (renders as the training template does)"
                 + (", with its default system prompt" if system else "")]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    path = out / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, notes


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError('a Modelfile value cannot contain """')
    return text
