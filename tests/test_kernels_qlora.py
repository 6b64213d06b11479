"""QLoRA through onecard's fused LoRA MLP: bitsandbytes NF4 base layers are dequantised per use inside the op.

Runs on CPU (bitsandbytes 0.50 dequantises on CPU too): the patched MLP of a QLoRA model must give the output and
the adapter gradients of peft's own Linear4bit path, and must not fall back to it.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")


def _qlora_mlp(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from onecard.train.layerwise import quantize_linears_

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for layer in model.model.layers:
        quantize_linears_(layer.mlp, "cpu", compute_dtype=torch.float32)
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            if not getattr(lin.weight, "bnb_quantized", True):
                lin.weight = lin.weight._quantize("cpu")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.0,
                     init_lora_weights=False)
    return get_peft_model(model, cfg)


def test_fused_mlp_engages_and_matches_peft_on_nf4(tiny_llama_dir, monkeypatch):
    from onecard.kernels import lora_mlp as lm
    from onecard.patch import apply_kernels

    model = _qlora_mlp(tiny_llama_dir)
    mlp = model.base_model.model.model.layers[0].mlp
    assert type(mlp.gate_proj.base_layer).__name__ == "Linear4bit"
    x = torch.randn(2, 5, mlp.gate_proj.in_features, requires_grad=True)

    def out_and_grads():
        y = mlp(x)
        params = [p for n, p in mlp.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.shape[-1])).sum(), [x, *params])
        return y.detach(), grads

    ref_y, ref_g = out_and_grads()
    calls = []
    real = lm.LoRAMLP.apply
    monkeypatch.setattr(lm.LoRAMLP, "apply", lambda *a: calls.append(1) or real(*a))
    handle = apply_kernels(model, "onecard", rope=False, fused_loss=False)
    assert handle.patched.get("mlp")
    y, grads = out_and_grads()
    assert calls, "the fused MLP fell back to peft's path for NF4 weights"
    torch.testing.assert_close(y, ref_y, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_g):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    handle.revert()


def test_dense_of_nf4_weight_is_its_dequantisation():
    import bitsandbytes as bnb

    from onecard.kernels.lora_mlp import dense, is_quantized

    w = torch.randn(32, 64)
    q = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")._quantize("cpu")
    assert is_quantized(q) and not is_quantized(w)
    d = dense(q, torch.float32)
    assert d.shape == (32, 64) and (d - w).abs().max() < 0.5 * w.abs().max()
    assert dense(w, torch.float32) is w
