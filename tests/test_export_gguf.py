"""GGUF export: read back by gguf.GGUFReader (every tensor, shapes, values, metadata) and by transformers."""

from __future__ import annotations

import numpy as np
import pytest
from onecard_run_fixtures import make_run, smollm2_base_dir


@pytest.fixture(scope="module")
def runs(tiny_model_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-runs")
    from onecard.tiny import save_tiny_model

    tied_base = save_tiny_model(root / "tied-base", "llama", tie_word_embeddings=True)
    return {"lora": make_run(root, tiny_model_factory("llama"), "lora", name="lora"),
            "tied": make_run(root, str(tied_base), "lora", name="tied")}


def _merged_state(run):
    import torch
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    base = AutoModelForCausalLM.from_pretrained(recipe["model"]["name_or_path"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(run / "adapter")).merge_and_unload()
    return merged.config, {k: v.float().numpy() for k, v in merged.state_dict().items()}


def _field(reader, key):
    f = reader.fields[key]
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]


def _hf_to_gguf_reference(name, array, config):
    from onecard.export.gguf_writer import permute_qk

    if name.endswith("q_proj.weight"):
        return permute_qk(array, config.num_attention_heads, config.num_attention_heads)
    if name.endswith("k_proj.weight"):
        return permute_qk(array, config.num_attention_heads, config.num_key_value_heads)
    return array


@pytest.mark.parametrize("file_type,rtol", [("f32", 0.0), ("f16", 2**-11)])
def test_gguf_reader_sees_every_tensor(runs, tmp_path, file_type, rtol):
    import gguf

    from onecard.export import export_run

    run = runs["lora"]
    result = export_run(run, "gguf", tmp_path / "g", gguf_type=file_type, device="cpu", log=lambda *_: None)
    assert result["verification"]["passed"], result["verification"]
    reader = gguf.GGUFReader(str(next((tmp_path / "g").glob("*.gguf"))))
    config, state = _merged_state(run)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    expected = {name_map.get_name(k, try_suffixes=(".weight",)): (k, v) for k, v in state.items()}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected)
    assert "output.weight" in tensors and "blk.1.attn_k.weight" in tensors
    for gname, (hf_name, array) in expected.items():
        t = tensors[gname]
        data = np.asarray(t.data, dtype=np.float32).reshape(array.shape)  # GGUF dims are reversed: data is row-major HF
        ref = _hf_to_gguf_reference(hf_name, array, config)
        np.testing.assert_allclose(data, ref, rtol=rtol, atol=1e-7 if rtol else 0, err_msg=gname)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == config.num_hidden_layers
    assert _field(reader, "llama.attention.head_count") == 4 and _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "llama.embedding_length") == config.hidden_size
    assert _field(reader, "llama.rope.dimension_count") == config.hidden_size // 4
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(_field(reader, "tokenizer.ggml.tokens")) == config.vocab_size
    assert len(_field(reader, "tokenizer.ggml.merges")) > 0
    assert "<|im_start|>" in _field(reader, "tokenizer.chat_template")
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 2  # <|im_end|>


def test_permutation_is_needed_and_reversed(runs, tmp_path):
    """Without the Q/K permutation the GGUF would load to a different model: the check must see it."""
    from onecard.export import ExportMismatch, export_run
    from onecard.export import gguf_writer

    original = gguf_writer.permute_qk
    try:
        gguf_writer.permute_qk = lambda w, n_head, n_kv=None: w
        with pytest.raises(ExportMismatch):
            export_run(runs["lora"], "gguf", tmp_path / "bad", gguf_type="f32", device="cpu", log=lambda *_: None)
    finally:
        gguf_writer.permute_qk = original


def test_tied_embeddings_write_no_output_tensor(runs, tmp_path):
    import gguf

    from onecard.export import export_run

    result = export_run(runs["tied"], "gguf", tmp_path / "t", gguf_type="bf16", device="cpu", log=lambda *_: None)
    path = next((tmp_path / "t").glob("*.gguf"))
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert result["verification"]["passed"] and result["stored_dtype"] == "bfloat16"


def test_untied_gemma_is_a_user_error(tiny_model_factory, tmp_path):
    """llama.cpp's gemma always reuses token_embd as the output layer: an untied lm_head cannot be written."""
    from onecard.errors import UserError
    from onecard.export import export_run

    run = make_run(tmp_path, tiny_model_factory("gemma"), "lora")
    with pytest.raises(UserError, match="separate lm_head"):
        export_run(run, "gguf", tmp_path / "g", device="cpu", log=lambda *_: None)
    assert not (tmp_path / "g").exists()  # refused before any work


@pytest.mark.slow
def test_smollm2_gguf_export_real_model(tmp_path):
    """A real Llama-architecture model (SmolLM2-135M: 9 heads / 3 KV heads, tied embeddings, smollm pre-tokenizer)."""
    base = smollm2_base_dir()
    from onecard.export import export_run

    run = make_run(tmp_path, str(base), "lora", scale=0.1)
    result = export_run(run, "gguf", tmp_path / "g", gguf_type="f16", device="cpu", log=lambda *_: None)
    v = result["verification"]
    assert v["passed"] and v["top1_agreement"] == 1.0 and v["adapter_effect_mean_abs"] > 10 * v["mean_abs_err"]
    assert any("pre-tokenizer smollm" in n and "tied embeddings" in n for n in result["notes"])
