"""generate_answers: greedy, deterministic, and batching (left padding) does not change the answers."""

from __future__ import annotations

import pytest

CONVS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you? tell me a long story"}],
    [{"role": "user", "content": "1 2 3"}],
]


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_factory("llama")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def test_batched_equals_one_by_one(tiny):
    from onecard.eval.generate import generate_answers

    model, tok = tiny
    batched = generate_answers(model, tok, CONVS, max_new_tokens=8, batch_size=3)
    single = [generate_answers(model, tok, [c], max_new_tokens=8, batch_size=1)[0] for c in CONVS]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)
    # a random tiny model emits something for at least one prompt (otherwise the comparison is vacuous)
    assert any(batched)
    assert generate_answers(model, tok, CONVS, max_new_tokens=8, batch_size=2) == batched


def test_progress_and_padding_side_restored(tiny):
    from onecard.eval.generate import generate_answers

    model, tok = tiny
    tok.padding_side = "right"
    seen: list[int] = []
    generate_answers(model, tok, CONVS, max_new_tokens=2, batch_size=2, progress=seen.append)
    assert sum(seen) == len(CONVS) and len(seen) == 2
    assert tok.padding_side == "right"
    assert generate_answers(model, tok, []) == []


def test_max_new_tokens_bounds_length(tiny):
    from onecard.eval.generate import generate_answers

    model, tok = tiny
    (short,) = generate_answers(model, tok, CONVS[:1], max_new_tokens=1)
    assert len(tok(short, add_special_tokens=False)["input_ids"]) <= 2
