"""Model-family facts keyed by Hugging Face ``model_type``: LoRA targets and fp16 safety.

LoRA targets are "all linear layers of the decoder blocks", the setting the QLoRA paper found
necessary to match full fine-tuning (Dettmers et al. 2023, sec. 4: "LoRA on all linear transformer
block layers are required to match full finetuning performance"), spelled with each family's module
names as transformers defines them (modeling_<family>.py in transformers 5.17).
"""

from __future__ import annotations

from dataclasses import dataclass

_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    model_type: str
    lora_targets: tuple[str, ...]
    fp16_safe: bool = True  # False: activations overflow fp16 (Llama 3: hidden states exceed 65504)
    note: str = ""


FAMILIES: dict[str, Family] = {
    # transformers/models/llama/modeling_llama.py: LlamaAttention.{q,k,v,o}_proj, LlamaMLP.{gate,up,down}_proj
    "llama": Family("llama", _LLAMA_STYLE),
    # transformers/models/mistral/modeling_mistral.py: same projection names as Llama
    "mistral": Family("mistral", _LLAMA_STYLE),
    # transformers/models/qwen2/modeling_qwen2.py: same names; q/k/v carry a bias
    "qwen2": Family("qwen2", _LLAMA_STYLE),
    # transformers/models/gemma/modeling_gemma.py and gemma2: same names (GeGLU MLP)
    "gemma": Family("gemma", _LLAMA_STYLE),
    "gemma2": Family("gemma2", _LLAMA_STYLE, fp16_safe=False, note="Gemma 2 was trained in bf16; fp16 overflows"),
    # transformers/models/phi3/modeling_phi3.py: fused qkv_proj and gate_up_proj
    "phi3": Family("phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
}


def family_for(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)


def is_llama3(config: dict) -> bool:
    """Llama 3 family: llama architecture with the 128k-token vocabulary (Meta's Llama 3 model card).

    Llama 3 is trained in bf16 and its activations exceed fp16's range, so fp16 training diverges.
    """
    return config.get("model_type") == "llama" and int(config.get("vocab_size", 0)) >= 128_000
