"""Prompt masking: exactly the assistant tokens and each turn's end-of-turn token are trained."""

from __future__ import annotations

import pytest

from onecard.data import IGNORE_INDEX, check_template_masking, resolve_template, tokenize_chat
from onecard.data.templates import ALPACA, CHATML, GEMMA_2, LLAMA_3
from onecard.errors import UserError
from onecard.tiny import build_tiny_tokenizer

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hello, how are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "Summarise the text."},
    {"role": "assistant", "content": "A short summary."},
    {"role": "user", "content": "yes or no?"},
    {"role": "assistant", "content": "yes"},
]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def llama_tok():
    t = build_tiny_tokenizer(chat_template=LLAMA_3)
    t.add_special_tokens({"additional_special_tokens": LLAMA_SPECIALS})
    t.bos_token = "<|begin_of_text|>"
    t.eos_token = "<|eot_id|>"
    return t


def trained_runs(tokenizer, labels):
    """Decoded maximal runs of trained tokens."""
    runs, run = [], []
    for tok in labels + [IGNORE_INDEX]:
        if tok == IGNORE_INDEX:
            if run:
                runs.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
        else:
            run.append(tok)
    return runs


def test_chatml_three_turns_token_by_token(tok):
    """Independent expectation: build the ChatML text piece by piece by hand, each piece with its own mask."""
    pieces = []
    for m in CHAT:
        train = m["role"] == "assistant"
        pieces += [(f"<|im_start|>{m['role']}\n", False), (m["content"], train), ("<|im_end|>", train), ("\n", False)]
    expected_ids, expected_labels = [], []
    for text, train in pieces:
        ids = tok.encode(text, add_special_tokens=False)
        expected_ids += ids
        expected_labels += ids if train else [IGNORE_INDEX] * len(ids)

    ids, labels = tokenize_chat(tok, CHATML, CHAT)

    assert ids == expected_ids
    assert labels == expected_labels
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    trained_ends = [i for i, (t, lab) in enumerate(zip(ids, labels)) if t == im_end and lab == im_end]
    assert len(trained_ends) == 3  # one per assistant turn; the system/user <|im_end|> stay masked
    assert trained_runs(tok, labels) == [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]


def test_llama3_template_trains_eot_not_headers(llama_tok):
    ids, labels = tokenize_chat(llama_tok, LLAMA_3, CHAT)
    text = llama_tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert trained_runs(llama_tok, labels) == [m["content"] + "<|eot_id|>" for m in CHAT if m["role"] == "assistant"]
    eot = llama_tok.convert_tokens_to_ids("<|eot_id|>")
    assert sum(1 for t in ids if t == eot) == len(CHAT)
    assert sum(1 for t in labels if t == eot) == 3
    assert check_template_masking(llama_tok, LLAMA_3) == []


def test_alpaca_builtin_trains_response_and_eos(tok):
    messages = [{"role": "user", "content": "Summarise the text."}, {"role": "assistant", "content": "A short summary."}]
    ids, labels = tokenize_chat(tok, ALPACA, messages)
    assert trained_runs(tok, labels) == ["A short summary." + tok.eos_token]
    assert "### Instruction" in tok.decode(ids) and "### Response" in tok.decode(ids)


def test_offsets_survive_bpe_merge_across_the_boundary(tok):
    """The assistant header ' sum' and content 'marise the text' merge into one BPE token ' summar':
    tokenize(prefix) is not a prefix of tokenize(full), yet masking still finds the turn."""
    template = (
        "{% for m in messages %}{% if m.role == 'user' %}{{ 'Q ' + m.content + '\n' }}"
        "{% else %}{{ ' sum' + m.content + eos_token + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ ' sum' }}{% endif %}"
    )
    messages = [{"role": "user", "content": "yes"}, {"role": "assistant", "content": "marise the text"}]
    prompt_ids = tok.encode("Q yes\n sum", add_special_tokens=False)
    ids, labels = tokenize_chat(tok, template, messages)
    assert ids[: len(prompt_ids)] != prompt_ids  # the naive prefix-diff would be misaligned here
    assert ids == tok.encode("Q yes\n summarise the text<|im_end|>\n", add_special_tokens=False)
    (run,) = trained_runs(tok, labels)
    assert run.endswith("marise the text<|im_end|>") and "yes" not in run


def test_template_rewriting_earlier_turns_is_located(tok):
    """Like Qwen3, which drops earlier turns' reasoning: spans are found in the full rendering."""
    template = (
        "{% for m in messages %}{% set c = m.content %}"
        "{% if m.role == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}"
        "{{ '<|im_start|>' + m.role + '\n' + c + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "no?"},
        {"role": "assistant", "content": "true"},
    ]
    _, labels = tokenize_chat(tok, template, messages)
    assert trained_runs(tok, labels) == ["yes<|im_end|>", "true<|im_end|>"]


def test_unlocatable_assistant_turn_raises(tok):
    # Renders every assistant turn as a fixed string: the content never appears and the text is not incremental.
    template = "{{ messages | length }}{% for m in messages %}{{ m.role }}{% endfor %}"
    with pytest.raises(UserError) as err:
        tokenize_chat(tok, template, CHAT[1:3], where="data.jsonl:4")
    assert "data.jsonl:4" in str(err.value) and "cannot locate assistant turn" in str(err.value)
    assert err.value.fix and "chat_template" in err.value.fix


def test_check_template_masking_reports_missing_stop_token(tok):
    no_stop = (
        "{% for m in messages %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    problems = check_template_masking(tok, no_stop)
    assert any("never stop" in p for p in problems)
    assert check_template_masking(tok, CHATML) == []


def test_check_template_masking_reports_system_rejection(tok):
    gemma_like = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    problems = check_template_masking(tok, gemma_like)
    assert problems == ["the chat template rejects a 'system' message; records that have one will fail"]


def test_resolve_template_choices(tok, llama_tok):
    assert resolve_template(tok, "auto") == tok.chat_template
    bare = build_tiny_tokenizer(chat_template=None)
    assert resolve_template(bare, "auto") == CHATML
    assert resolve_template(tok, "alpaca") == ALPACA
    assert resolve_template(llama_tok, "llama-3") == LLAMA_3
    with pytest.raises(UserError, match="<\\|eot_id\\|>"):
        resolve_template(tok, "llama-3")


# Published templates, abbreviated only where they handle tools: Gemma (the built-in Gemma 2 text) rejects
# system messages and renames assistant -> model; Mistral (mistralai/Mistral-7B-Instruct-v0.1) has
# no generation prompt and ends answers with eos_token directly after ' [/INST]'.
GEMMA = GEMMA_2  # the built-in is google/gemma-2-9b-it's own text
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    "template, specials, end",
    [(GEMMA, ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"), (MISTRAL, ["<s>"], "<|im_end|>")],
    ids=["gemma", "mistral"],
)
def test_published_templates_without_generation_markers(template, specials, end):
    tok = build_tiny_tokenizer(chat_template=template)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token = specials[0]
    ids, labels = tokenize_chat(tok, template, CHAT[1:])
    assert trained_runs(tok, labels) == [m["content"] + end for m in CHAT[1:] if m["role"] == "assistant"]
    assert labels.count(IGNORE_INDEX) == len(ids) - sum(len(tok.encode(r, add_special_tokens=False)) for r in trained_runs(tok, labels))
    # both published templates raise on a system message; that is reported, and masking is otherwise fine
    assert check_template_masking(tok, template) == ["the chat template rejects a 'system' message; records that have one will fail"]


def test_slow_tokenizer_path_agrees_with_offsets_when_pieces_align(tok):
    """Slow tokenizers have no offsets: the piecewise fallback must give the same labels on ChatML."""
    from onecard.data.masking import _label_by_offsets, _label_by_pieces, assistant_spans

    full, spans = assistant_spans(tok, CHATML, CHAT)
    ids, trained = _label_by_offsets(tok, [full], [spans])[0]
    assert _label_by_pieces(tok, full, spans) == (list(ids), trained.tolist())
