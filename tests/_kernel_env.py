"""Shared by tests/test_kernels_*.py and test_patch_*.py: run Triton kernels under the CPU interpreter.

Must run before ``onecard.kernels`` is first imported (Triton reads TRITON_INTERPRET when a kernel
is decorated). On a CUDA machine the env var is left alone so the compiled kernels are tested.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def assert_close_rel(a, b, tol: float, what: str = ""):
    assert not torch.isnan(a).any(), f"{what}: NaN"
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def triton_active() -> bool:
    from onecard.kernels._triton import HAS_TRITON, INTERPRET

    return HAS_TRITON and (INTERPRET or torch.cuda.is_available())


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_cuda_lora(fp8: bool):
    """A 3-layer bf16 Llama with peft LoRA on every linear, on CUDA: lora_B drawn N(0, 0.02) so every adapter
    tensor has a gradient, the frozen linears FP8 where ``fp8``, non-reentrant checkpoints with onecard's recompute
    contexts. The caller adds offloading, train mode and kernels."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from onecard.patch.fp8 import apply_fp8_base
    from onecard.patch.recompute import recompute_contexts
    from onecard.tiny import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=320, hidden_size=512, intermediate_size=1024, num_hidden_layers=3)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    if fp8:  # the frozen base layers peft wrapped
        assert apply_fp8_base(model).patched["fp8_linear"] == len(LORA_TARGETS) * 3
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                       "context_fn": recompute_contexts})
    model.enable_input_require_grads()
    return model
