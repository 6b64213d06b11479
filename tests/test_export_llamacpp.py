"""llama.cpp itself loads the exported GGUF, tokenises like transformers, and its logits match the trained model."""

from __future__ import annotations

import numpy as np
import pytest
from onecard_run_fixtures import make_run

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)")

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
