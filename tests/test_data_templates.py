"""Named chat templates: each built-in trains exactly the assistant contents and the token that ends their turns
(the family's stop token, or EOS), and the recipe offers exactly these names."""

from __future__ import annotations

import typing

import pytest

from onecard.data.masking import check_template_masking, tokenize_chat
from onecard.data.templates import BUILTIN_TEMPLATES, STOP_TOKENS, TEMPLATE_TOKENS, resolve_template
from onecard.errors import UserError
from onecard.recipe import DataSection
from onecard.tiny import build_tiny_tokenizer

TURNS = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."},
         {"role": "user", "content": "And three plus three?"}, {"role": "assistant", "content": "Six."}]
NO_SYSTEM = ("mistral-v3", "mistral-tekken", "gemma-2")  # their published templates raise on a system message


def family_tokenizer(name: str):
    """The tiny tokenizer with the template's special tokens and a BOS, as the family's real tokenizer has them."""
    tok = build_tiny_tokenizer(chat_template=None)
    tok.add_special_tokens({"bos_token": "<s>", "additional_special_tokens": list(TEMPLATE_TOKENS[name]) + ["<|system|>"]})
    return tok


def trained_runs(tok, labels) -> list[list[int]]:
    runs, run = [], []
    for token in labels + [-100]:
        if token == -100:
            runs, run = (runs + [run] if run else runs), []
        else:
            run.append(token)
    return runs


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_trains_assistant_content_and_its_stop_token(name):
    tok = family_tokenizer(name)
    template = resolve_template(tok, name)
    messages = TURNS if name in NO_SYSTEM else [{"role": "system", "content": "You are terse."}] + TURNS
    ids, labels = tokenize_chat(tok, template, messages)
    stop = STOP_TOKENS[name] or tok.eos_token
    runs = trained_runs(tok, labels)
    assert len(runs) == 2, tok.decode(ids)
    for run, answer in zip(runs, ("Four.", "Six.")):
        assert run[-1] == tok.convert_tokens_to_ids(stop)  # the turn's end is learned: the model stops
        assert tok.decode(run[:-1]).strip() == answer     # and nothing of the prompt is trained
    assert "What is two plus two?" in tok.decode(ids)
    problems = check_template_masking(tok, template)
    assert problems == (["the chat template rejects a 'system' message; records that have one will fail"]
                        if name in NO_SYSTEM else [])


def test_a_builtin_needs_its_tokens():
    tok = build_tiny_tokenizer()  # ChatML specials only, no BOS
    with pytest.raises(UserError) as err:
        resolve_template(tok, "gemma-2")
    assert "<start_of_turn>" in err.value.what and "a bos token" in err.value.what
    assert resolve_template(tok, "qwen2.5") == BUILTIN_TEMPLATES["qwen2.5"]


def test_recipe_offers_every_builtin_by_name():
    names = typing.get_args(DataSection.model_fields["chat_template"].annotation)
    assert set(names) == {"auto", *BUILTIN_TEMPLATES}
    assert set(TEMPLATE_TOKENS) == set(STOP_TOKENS) == set(BUILTIN_TEMPLATES)
