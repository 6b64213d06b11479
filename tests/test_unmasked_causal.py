"""Whole causal rows without a mask (patch/unmasked_causal.py): where transformers cannot look at the data (a CUDA
graph being recorded; emulated here by making its ``is_tracing`` say yes) it builds the dense block-causal mask;
under the context it builds none, and the model computes the same function through sdpa's ``is_causal``."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import masking_utils

from onecard.patch import unmasked_causal
from onecard.tiny import tiny_config

_IDS = torch.zeros(1, 8, dtype=torch.long)


def _model(arch: str = "qwen2", attn: str = "sdpa"):
    torch.manual_seed(0)
    cfg = tiny_config(arch, vocab_size=96)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def _masks_seen(monkeypatch, model) -> list:
    """The masks the decoder layers receive, one entry per layer call."""
    seen = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("attention_mask")),
                                        with_kwargs=True)
    return seen


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_while_transformers_cannot_look_no_mask_is_built_and_the_function_is_unchanged(monkeypatch, arch):
    model = _model(arch)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
    seen = _masks_seen(monkeypatch, model)
    monkeypatch.setattr(masking_utils, "is_tracing", lambda *a, **k: True)
    with torch.no_grad():
        traced = model(input_ids=ids, use_cache=False).logits
        assert seen and all(isinstance(m, torch.Tensor) and m.dim() == 4 for m in seen)  # the dense mask
        seen.clear()
        with unmasked_causal.causal_rows_without_mask(model, {"input_ids": ids}):
            unmasked = model(input_ids=ids, use_cache=False).logits
    assert seen and all(m is None for m in seen)
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unmasked, eager, rtol=1e-5, atol=1e-5)  # still causal: the future stays unseen
    assert model.config._attn_implementation == "sdpa"


def test_the_implementation_is_restored_when_the_body_raises():
    model = _model()
    with pytest.raises(RuntimeError, match="boom"):
        with unmasked_causal.causal_rows_without_mask(model, {"input_ids": _IDS}):
            assert model.config._attn_implementation == unmasked_causal.ALIAS
            raise RuntimeError("boom")
    assert {c._attn_implementation for c in unmasked_causal._configs(model)} == {"sdpa"}


@pytest.mark.parametrize("key", ["attention_mask", "position_ids"])
def test_a_batch_that_carries_a_mask_or_positions_is_refused(key):
    model = _model()
    with pytest.raises(ValueError, match=f"carries {key}"):
        with unmasked_causal.causal_rows_without_mask(model, {"input_ids": _IDS, key: None}):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_eager_attention_is_refused_it_would_see_the_future():
    model = _model(attn="eager")
    assert "needs sdpa" in unmasked_causal.refusal(model, {"input_ids": _IDS})
    assert unmasked_causal.refusal(_model(), {"input_ids": _IDS, "labels": _IDS}) is None


def test_a_sliding_window_shorter_than_the_rows_is_refused():
    model = _model("mistral")
    model.config.sliding_window = 16
    ids = torch.zeros(1, 24, dtype=torch.long)
    assert "sliding window of 16" in unmasked_causal.refusal(model, {"input_ids": ids})
    assert unmasked_causal.refusal(model, {"input_ids": ids[:, :16]}) is None
