"""The planner's FP8 base: bytes to the byte against a real FP8-patched model, catalog FP8 peaks, speed hooks."""

import _kernel_env  # noqa: F401
import pytest
import torch

from onecard.catalog.gpus import GPUS, get_gpu
from onecard.plan.fp8 import fp8_base_weight_bytes, fp8_speedup_bound, frozen_gemm_flops_per_token


def test_fp8_base_bytes_match_a_patched_model(tiny_llama_dir):
    import transformers

    from onecard.catalog.models import resolve_shape
    from onecard.patch.fp8 import apply_fp8_base

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    model.requires_grad_(False)
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    apply_fp8_base(model)
    tensors = {t.data_ptr(): t for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if "rotary_emb" not in n}  # RoPE's inverse frequencies are no weights; tied tensors counted once
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    shape = resolve_shape(str(tiny_llama_dir))
    assert fp8_base_weight_bytes(shape, 2) == held
    assert fp8_base_weight_bytes(shape, 2) < dense


def test_every_fp8_card_is_cited_and_faster_than_its_bf16():
    import inspect

    import onecard.catalog.gpus as gpus

    src = inspect.getsource(gpus)
    for gpu in GPUS.values():
        if gpu.arch == "ampere":
            assert gpu.fp8_dense_tflops is None, gpu.id
            continue
        assert gpu.fp8_dense_tflops == pytest.approx(2 * gpu.bf16_dense_tflops, rel=0.02), gpu.id
        assert f"fp8_dense_tflops={gpu.fp8_dense_tflops:g}" in src.replace(".0,", ",").replace(".0)", ")"), gpu.id
    assert get_gpu("rtx4090").fp8_dense_tflops == 330.3  # fp32 accumulate (Ada whitepaper v2.02), not 660.6


def _plan(base, gpu="h200"):
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import plan_memory
    from onecard.plan.speed import estimate_throughput
    from onecard.recipe import validate_recipe

    r = validate_recipe({"model": {"name_or_path": "llama-3-8b"}, "quant": {"base": base}, "plan": {"gpu": gpu},
                         "training": {"micro_batch_size": 8}})
    p = inputs_from_recipe(r)
    m = plan_memory(p)
    return p, m, estimate_throughput(p, memory_plan=m)


def test_plan_fp8_halves_the_block_weights_and_speeds_the_frozen_gemms():
    p, m_fp8, t_fp8 = _plan("fp8")
    _, m_bf16, t_bf16 = _plan("none")
    s = p.shape
    block = s.num_hidden_layers * s.linear_params_per_layer()
    saved = m_bf16.component("weights").bytes - m_fp8.component("weights").bytes
    rows = s.num_hidden_layers * sum(o for _, _, o in s.linear_layers_per_block())
    assert saved == block - 4 * rows  # 2 -> 1 byte per block weight, + one fp32 scale per output channel
    assert "FP8" in m_fp8.component("weights").label and t_fp8.label == "estimated"
    fl = t_fp8.flops
    bound = fp8_speedup_bound(fl, p.gpu)
    assert 1.5 < bound < 2.0  # the LM head, attention and LoRA stay bf16
    assert frozen_gemm_flops_per_token(fl) < fl.matmul_per_token
    assert t_fp8.ceiling_tokens_per_s == pytest.approx(t_bf16.ceiling_tokens_per_s * bound, rel=1e-6)


def test_plan_fp8_on_a_card_without_fp8_says_so():
    _, _, t = _plan("fp8", "rtx3090")
    assert any("no FP8 tensor cores" in n for n in t.notes)
