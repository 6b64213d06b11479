"""GGUF export of every family onecard trains, q8_0 through gguf-py, and what is refused before any work.

Each file is read back twice: by gguf.GGUFReader (architecture keys, tensor types, the Gemma norm offset and
the absent Q/K permutation checked against the merged weights) and by the export's own logit check.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from onecard_run_fixtures import cli_exit_code, make_run


def _run(tmp_path, arch, **overrides):
    from onecard.tiny import save_tiny_model

    base = save_tiny_model(tmp_path / f"base-{arch}", arch, **overrides)
    run = make_run(tmp_path, str(base), "lora", name=f"run-{arch}")
    if arch == "gemma2":  # soft-capped attention: transformers has no SDPA path for it
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        recipe["model"]["attn_implementation"] = "eager"
        (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run


def _merged(run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    base = AutoModelForCausalLM.from_pretrained(recipe["model"]["name_or_path"], dtype=torch.float32,
                                                attn_implementation="eager")
    return {k: v.float().numpy() for k, v in PeftModel.from_pretrained(base, str(run / "adapter"))
            .merge_and_unload().state_dict().items()}


def _reader(out):
    import gguf

    reader = gguf.GGUFReader(str(next(out.glob("*.gguf"))))
    fields = {k: (f.contents() if hasattr(f, "contents") else None) for k, f in reader.fields.items()}
    return reader, fields, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("arch,overrides", [
    ("qwen2", {}),
    ("gemma2", {"tie_word_embeddings": True, "query_pre_attn_scalar": 16}),
])
def test_family_exports_and_reads_back(tmp_path, arch, overrides):
    from onecard.export import export_run

    run = _run(tmp_path, arch, **overrides)
    result = export_run(run, "gguf", tmp_path / "g", gguf_type="f32", device="cpu", log=lambda *_: None)
    v = result["verification"]
    assert v["passed"] and v["top1_agreement"] == 1.0 and v["adapter_effect_mean_abs"] > 100 * v["mean_abs_err"]
    _, fields, tensors = _reader(tmp_path / "g")
    state = _merged(run)
    assert fields["general.architecture"] == arch
    q = np.asarray(tensors["blk.0.attn_q.weight"].data, dtype=np.float32).reshape(state["model.layers.0.self_attn.q_proj.weight"].shape)
    np.testing.assert_allclose(q, state["model.layers.0.self_attn.q_proj.weight"], rtol=0, atol=0)  # NeoX RoPE: no permutation
    norm = np.asarray(tensors["blk.0.attn_norm.weight"].data, dtype=np.float32)
    offset = 1.0 if arch == "gemma2" else 0.0
    np.testing.assert_allclose(norm, state["model.layers.0.input_layernorm.weight"] + offset, rtol=1e-6)
    if arch == "qwen2":
        assert "blk.0.attn_q.bias" in tensors and fields["tokenizer.ggml.pre"] == "qwen2"  # Qwen2Tokenizer's split
    else:
        assert "output.weight" not in tensors and "blk.0.post_ffw_norm.weight" in tensors
        assert fields["gemma2.attn_logit_softcapping"] == pytest.approx(50.0)
        assert fields["gemma2.final_logit_softcapping"] == pytest.approx(30.0)
        assert fields["gemma2.attention.sliding_window"] == 4096
        assert fields["gemma2.attention.key_length"] == 16


def test_q8_0_export_without_llama_cpp(tmp_path, monkeypatch):
    """q8_0 is written by gguf-py; without llama.cpp transformers' loader dequantises it for the check."""
    import gguf

    from onecard.export import export_run, gguf_quant

    monkeypatch.setattr(gguf_quant, "have_llama_cpp", lambda: False)
    result = export_run(_run(tmp_path, "llama"), "gguf", tmp_path / "q", gguf_type="q8_0", device="cpu",
                        log=lambda *_: None)
    v = result["verification"]
    assert v["passed"] and v["runtime"] == "transformers" and result["stored_dtype"] == "q8_0"
    assert 1e-5 < v["value"] <= v["tolerance"]  # quantised: an error well above f32's, inside q8_0's tolerance
    assert v["nearer_tuned_than_base"]
    _, fields, tensors = _reader(tmp_path / "q")
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (tmp_path / "q" / "Modelfile").read_text().startswith("# Ollama Modelfile")


def test_quantised_mismatch_exits_1(tmp_path, monkeypatch):
    from onecard.export import gguf_quant, gguf_writer

    monkeypatch.setattr(gguf_quant, "have_llama_cpp", lambda: False)
    monkeypatch.setattr(gguf_writer, "permute_qk", lambda w, n_head, n_kv=None: w)
    run = _run(tmp_path, "llama")
    assert cli_exit_code(["export", str(run), "--format", "gguf", "--quant", "q8_0", "--out", str(tmp_path / "bad")]) == 1
    assert not yaml.safe_load((tmp_path / "bad" / "export.json").read_text())["verification"]["passed"]


def test_refused_before_work_without_llama_cpp(tmp_path, monkeypatch):
    """q4_k_m needs llama.cpp's quantiser, and a gemma file can only be checked in llama.cpp: exit 2, no output."""
    from onecard.export import gguf_quant

    monkeypatch.setattr(gguf_quant, "have_llama_cpp", lambda: False)
    run = _run(tmp_path, "llama")
    assert cli_exit_code(["export", str(run), "--format", "gguf", "--quant", "q4_k_m", "--out", str(tmp_path / "a")]) == 2
    gemma = _run(tmp_path, "gemma", tie_word_embeddings=True)
    assert cli_exit_code(["export", str(gemma), "--format", "gguf", "--quant", "f16", "--out", str(tmp_path / "b")]) == 2
    assert cli_exit_code(["export", str(run), "--format", "gguf", "--quant", "q3_x", "--out", str(tmp_path / "c")]) == 2
    assert not any((tmp_path / d).exists() for d in "abc")


def test_gemma2_refuses_a_query_scale_llama_cpp_would_not_use(tmp_path):
    from onecard.errors import UserError
    from onecard.export import export_run

    run = _run(tmp_path, "gemma2", tie_word_embeddings=True)  # query_pre_attn_scalar 256, head_dim 16
    with pytest.raises(UserError, match="query_pre_attn_scalar"):
        export_run(run, "gguf", tmp_path / "g", device="cpu", log=lambda *_: None)


def test_a_file_without_the_adapter_is_nearer_the_base(tmp_path, monkeypatch):
    """The check quantised types rely on when their rounding exceeds the adapter's effect: drop the adapter
    (peft's unload instead of merge) and the export is found nearer the base than the tuned model."""
    from onecard.export import ExportMismatch, export_run, gguf_quant, reference

    monkeypatch.setattr(gguf_quant, "have_llama_cpp", lambda: False)
    monkeypatch.setattr(reference, "merged_float32", lambda ref: ref.model.unload())
    with pytest.raises(ExportMismatch) as err:
        export_run(_run(tmp_path, "llama"), "gguf", tmp_path / "g", gguf_type="q8_0", device="cpu", log=lambda *_: None)
    v = err.value.result["verification"]
    assert v["nearer_tuned_than_base"] is False and v["mean_abs_err_vs_base"] < v["mean_abs_err"]
    assert any("nearer the base" in n for n in err.value.result["notes"])
