"""What each model family needs in a GGUF file, one row per HF ``model_type``, following llama.cpp's converter.

Sources (ggml-org/llama.cpp, as vendored in llama-cpp-python 0.3.36): ``conversion/llama.py`` (LlamaModel),
``conversion/qwen.py`` (Qwen2Model), ``conversion/gemma.py`` (GemmaModel, Gemma2Model), ``conversion/base.py``
(TextModel.set_gguf_parameters), and the loaders ``src/models/gemma.cpp`` / ``gemma2.cpp``:
- Llama (and Mistral without sliding window, which llama.cpp runs as ``llama``) rotates pairs of adjacent
  rows, so HF's rotate-half Q/K rows are permuted; Qwen2 and Gemma use NeoX RoPE and are written as they are.
- Gemma's RMSNorm computes ``x * (1 + w)``; llama.cpp multiplies by the stored weight, so the converter
  writes ``w + 1`` for every ``*norm.weight``.
- llama.cpp's Gemma and Gemma 2 always use ``token_embd`` as the output matrix (``TENSOR_DUPLICATED``): an
  untied ``lm_head`` could not be written.
- Gemma 2 adds the attention and final logit soft-capping and the sliding window; llama.cpp puts the window
  on every other layer starting with layer 0 (``load_swa_pattern(ml, 2)``) and scales queries by
  ``1/sqrt(head_dim)`` (``1/sqrt(hidden/heads)`` for the 46-layer 27B), so a config whose
  ``query_pre_attn_scalar`` or ``layer_types`` differ is refused rather than written to run differently.
"""

from __future__ import annotations

from dataclasses import dataclass

from onecard.errors import UserError

_CONVERT = "export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py"


@dataclass(frozen=True)
class Family:
    arch: str  # gguf.MODEL_ARCH member name; its lower case is general.architecture
    permute_qk: bool  # llama.cpp's llama arch: interleaved RoPE pairs (LlamaModel.permute)
    norm_offset: float  # added to every *norm.weight (Gemma's 1 + w)
    tied_output_only: bool  # llama.cpp reuses token_embd as output; an untied lm_head is refused
    converter: str  # the convert_hf_to_gguf class this row follows


FAMILIES = {
    "llama": Family("LLAMA", True, 0.0, False, "LlamaModel"),
    "mistral": Family("LLAMA", True, 0.0, False, "LlamaModel (Mistral without sliding window)"),
    "qwen2": Family("QWEN2", False, 0.0, False, "Qwen2Model"),
    "gemma": Family("GEMMA", False, 1.0, True, "GemmaModel"),
    "gemma2": Family("GEMMA2", False, 1.0, True, "Gemma2Model"),
}


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", "?")
    if model_type not in FAMILIES:
        raise UserError(f"GGUF export supports {', '.join(FAMILIES)} models, not {model_type!r}",
                        where="--format gguf", fix=_CONVERT)
    return FAMILIES[model_type]


def rope_params(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_family(config) -> Family:
    """The family row, or a UserError for a config llama.cpp would run differently from transformers."""
    family = family_of(config)
    model_type = config.model_type
    layer_types = list(getattr(config, "layer_types", None) or [])
    if model_type == "gemma2":
        _check_gemma2(config, layer_types)
    elif getattr(config, "sliding_window", None) or "sliding_attention" in layer_types:
        raise UserError(f"GGUF export: sliding-window attention is not written for {model_type}",
                        where="--format gguf", fix=_CONVERT)
    if family.tied_output_only and not getattr(config, "tie_word_embeddings", False):
        raise UserError(f"GGUF export: llama.cpp's {model_type} reuses the embeddings as the output layer, "
                        "and this model has a separate lm_head", where="--format gguf", fix=_CONVERT)
    rope = rope_params(config)
    allowed = ("default", "linear", "llama3") if family.arch == "LLAMA" else ("default", "linear")
    if rope.get("rope_type", "default") not in allowed:
        raise UserError(f"GGUF export: RoPE scaling {rope.get('rope_type')!r} is not written for {model_type}",
                        where="--format gguf", fix=_CONVERT)
    return family


def _check_gemma2(config, layer_types: list[str]) -> None:
    expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)]
    if layer_types and layer_types != expected:
        raise UserError("GGUF export: llama.cpp's gemma2 slides the window on even layers only; this config's "
                        "layer_types differ", where="--format gguf", fix=_CONVERT)
    basis = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 46 else head_dim(config)
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and float(scalar) != float(basis):
        raise UserError(f"GGUF export: llama.cpp scales gemma2 queries by 1/sqrt({basis}), this config by "
                        f"1/sqrt({scalar}) (query_pre_attn_scalar)", where="--format gguf", fix=_CONVERT)
    if config.attn_logit_softcapping is None or config.final_logit_softcapping is None:
        raise UserError("GGUF export: gemma2 without logit soft-capping is not written (llama.cpp's gemma2 always "
                        "caps)", where="--format gguf", fix=_CONVERT)


def write_family_metadata(writer, config) -> None:
    """Keys beyond TextModel.set_gguf_parameters that a family's converter adds."""
    if config.model_type in ("gemma", "gemma2") or head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if config.model_type == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        writer.add_sliding_window(int(config.sliding_window))
