"""Which modules of each family get which kernel, keyed by ``config.model_type``.

Class names and activation config keys are transformers 5.17's (models/<family>/modeling_*.py).
Gemma 2's attention (logit soft-capping, alternating sliding window) keeps transformers' forward;
its final-logit soft-capping is handled by the fused loss (``config.final_logit_softcapping``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyKernels:
    norm_classes: tuple[str, ...]
    mlp_class: str
    attention_class: str | None  # None: keep transformers' attention forward
    gemma_norm: bool = False  # (1 + weight) RMSNorm, cast after multiply
    act_key: str = "hidden_act"  # config key of the MLP activation
    sliding_window: str | None = None  # where the attention reads it: "attr", "config" or None
    # The decoder layer adds the MLP output straight to the residual (no post-MLP norm reads it), so a
    # checkpoint's recompute may skip the down projection (patch/recompute.py). Gemma 2 normalises it first.
    mlp_feeds_residual: bool = True
    # The decoder layer class when its forward is LlamaDecoderLayer's (pre-norm attention, then pre-norm MLP, each
    # added to the residual): offloaded checkpoints may then checkpoint the two halves apart (patch/blocks.py).
    decoder_class: str | None = None


SWIGLU_ACTS = ("silu", "swish")
GEGLU_ACTS = ("gelu_pytorch_tanh", "gelu_tanh")

FAMILY_KERNELS: dict[str, FamilyKernels] = {
    "llama": FamilyKernels(("LlamaRMSNorm",), "LlamaMLP", "LlamaAttention", decoder_class="LlamaDecoderLayer"),
    "mistral": FamilyKernels(("MistralRMSNorm",), "MistralMLP", "MistralAttention", sliding_window="config",
                             decoder_class="MistralDecoderLayer"),
    "qwen2": FamilyKernels(("Qwen2RMSNorm",), "Qwen2MLP", "Qwen2Attention", sliding_window="attr",
                           decoder_class="Qwen2DecoderLayer"),
    "gemma": FamilyKernels(("GemmaRMSNorm",), "GemmaMLP", "GemmaAttention", gemma_norm=True,
                           decoder_class="GemmaDecoderLayer"),
    "gemma2": FamilyKernels(("Gemma2RMSNorm",), "Gemma2MLP", None, gemma_norm=True, act_key="hidden_activation",
                             mlp_feeds_residual=False),
}
