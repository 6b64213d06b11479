"""Model-family facts keyed by Hugging Face ``model_type``, one record per family: LoRA targets, fp16 safety and
which of onecard's kernels exist for it; and the methods onecard refuses under FSDP. patch/, plan/ and train/ read
them here (pure data: no torch, no transformers).

LoRA targets are "all linear layers of the decoder blocks", the setting the QLoRA paper found
necessary to match full fine-tuning (Dettmers et al. 2023, sec. 4: "LoRA on all linear transformer
block layers are required to match full finetuning performance"), spelled with each family's module
names as transformers defines them (modeling_<family>.py in transformers 5.17).

Kernel records (:class:`FamilyKernels`): the class names and activation config keys onecard.patch replaces, as
transformers 5.17 spells them (models/<family>/modeling_*.py). Gemma 2's attention (logit soft-capping, alternating
sliding window) keeps transformers' forward; its final-logit soft-capping is handled by the fused loss
(``config.final_logit_softcapping``).
"""

from __future__ import annotations

from dataclasses import dataclass

_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


@dataclass(frozen=True)
class Family:
    model_type: str
    lora_targets: tuple[str, ...]
    fp16_safe: bool = True  # False: activations overflow fp16 (Llama 3: hidden states exceed 65504)
    note: str = ""
    kernels: FamilyKernels | None = None  # None: onecard has no fused kernels for the family (plain transformers)
    no_sdpa_since: str | None = None  # the transformers release from which the family's class has no SDPA path


FAMILIES: dict[str, Family] = {
    # transformers/models/llama/modeling_llama.py: LlamaAttention.{q,k,v,o}_proj, LlamaMLP.{gate,up,down}_proj
    "llama": Family("llama", _LLAMA_STYLE, kernels=FamilyKernels(
        ("LlamaRMSNorm",), "LlamaMLP", "LlamaAttention", decoder_class="LlamaDecoderLayer")),
    # transformers/models/mistral/modeling_mistral.py: same projection names as Llama
    "mistral": Family("mistral", _LLAMA_STYLE, kernels=FamilyKernels(
        ("MistralRMSNorm",), "MistralMLP", "MistralAttention", sliding_window="config",
        decoder_class="MistralDecoderLayer")),
    # transformers/models/qwen2/modeling_qwen2.py: same names; q/k/v carry a bias
    "qwen2": Family("qwen2", _LLAMA_STYLE, kernels=FamilyKernels(
        ("Qwen2RMSNorm",), "Qwen2MLP", "Qwen2Attention", sliding_window="attr", decoder_class="Qwen2DecoderLayer")),
    # transformers/models/gemma/modeling_gemma.py and gemma2: same names (GeGLU MLP)
    "gemma": Family("gemma", _LLAMA_STYLE, kernels=FamilyKernels(
        ("GemmaRMSNorm",), "GemmaMLP", "GemmaAttention", gemma_norm=True, decoder_class="GemmaDecoderLayer")),
    # transformers 5.21.0 models/gemma2/modeling_gemma2.py: "_supports_sdpa = False  # sdpa does not support
    # softcapping" (5.20.0 and earlier: True), so from 5.21 an auto attention runs eager (train/model.py)
    "gemma2": Family("gemma2", _LLAMA_STYLE, fp16_safe=False, note="Gemma 2 was trained in bf16; fp16 overflows",
                     kernels=FamilyKernels(("Gemma2RMSNorm",), "Gemma2MLP", None, gemma_norm=True,
                                           act_key="hidden_activation", mlp_feeds_residual=False),
                     no_sdpa_since="5.21.0"),
    # transformers/models/phi3/modeling_phi3.py: fused qkv_proj and gate_up_proj
    "phi3": Family("phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
}


def family_for(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)


def kernels_for(model_type: str | None) -> FamilyKernels | None:
    """onecard's kernel record for the family, or None where it has none (the model runs plain transformers)."""
    family = FAMILIES.get(model_type) if model_type else None
    return family.kernels if family is not None else None


# Methods onecard refuses under FSDP, with why; train refuses them and the planner reads the same table, so it never
# proposes what train refuses. Empty under FSDP2: DoRA was refused under FSDP1, where its magnitude layer (its own
# unit under peft's wrap policy) read lora_A's weight outside lora_A's unit -- IndexError in peft/tuners/lora/dora.py
# get_lora_weight on 2 x H200 (notes/multigpu.md); FSDP2's units are whole decoder layers, and DoRA on 2 CPU
# processes equals one process (tests/test_distributed_fsdp.py).
NOT_UNDER_FSDP: dict[str, str] = {}
NOT_UNDER_FSDP_FIX = "use --strategy ddp if the model fits one GPU, or method lora"


def is_llama3(config: dict) -> bool:
    """Llama 3 family: llama architecture with the 128k-token vocabulary (Meta's Llama 3 model card).

    Llama 3 is trained in bf16 and its activations exceed fp16's range, so fp16 training diverges.
    """
    return config.get("model_type") == "llama" and int(config.get("vocab_size", 0)) >= 128_000
