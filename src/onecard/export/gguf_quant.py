"""Quantised GGUF types and running a GGUF in llama.cpp itself, through llama-cpp-python (``onecard[gguf-quant]``).

Types (``GGUF_TYPES``):
- ``f32`` / ``f16`` / ``bf16``: written by ``gguf_writer`` directly.
- ``q8_0``: written by ``gguf_writer`` through ``gguf.quants.quantize`` -- the numpy port of ggml's
  ``quantize_row_q8_0_ref`` that llama.cpp's own ``convert_hf_to_gguf.py --outtype q8_0`` uses; 1-D tensors stay
  float32 and a matrix whose rows are not a multiple of the 32-weight block falls back to f16, as there.
- ``q4_k_m``: gguf-py does not implement the k-quants (``gguf.quants.quantize`` raises NotImplementedError for
  Q4_K), so an f16 file is written first and llama.cpp's quantiser turns it into Q4_K_M
  (``llama_cpp.llama_model_quantize``: its mix of Q4_K and Q6_K, with llama.cpp's fallbacks for rows not a
  multiple of 256). The f16 source adds a rounding ~16x smaller than Q8_0's, negligible against Q4_K's.

Every quantised file is verified by running it in llama.cpp (``llamacpp_logits``), so both types need
llama-cpp-python; without it the export is refused before any work (``require_llama_cpp``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from onecard.errors import UserError

FLOAT_TYPES = ("f32", "f16", "bf16")
QUANT_TYPES = ("q8_0", "q4_k_m")
GGUF_TYPES = FLOAT_TYPES + QUANT_TYPES
STORED_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "q8_0": "q8_0", "q4_k_m": "q4_k_m"}
INSTALL_FIX = "pip install 'onecard[gguf-quant]'  (llama-cpp-python; it builds llama.cpp from source, minutes)"


def have_llama_cpp() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def require_llama_cpp(why: str) -> None:
    if not have_llama_cpp():
        raise UserError(f"{why} needs llama.cpp (llama-cpp-python), which is not installed", where="--quant",
                        fix=INSTALL_FIX)


# Architectures transformers' GGUF loader reads back (modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES).
TRANSFORMERS_READS = ("llama", "mistral", "qwen2", "gemma2")


def check_gguf_type(gguf_type: str) -> None:
    """Before any work: a known type, and llama.cpp's quantiser when the type needs it."""
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"unknown GGUF type {gguf_type!r}", where="--quant", fix=f"use one of {', '.join(GGUF_TYPES)}")
    if gguf_type == "q4_k_m":
        require_llama_cpp("a q4_k_m export (llama.cpp's quantiser, then a check in llama.cpp)")


def verifier_for(model_type: str, gguf_type: str) -> str:
    """Where the written file is run for the logit check: ``llama.cpp`` or ``transformers`` (its GGUF loader
    dequantises to float32, so it measures the file's rounding alone). A UserError before any work when the
    check needs llama.cpp and it is not installed."""
    check_gguf_type(gguf_type)
    if gguf_type == "q4_k_m":
        return "llama.cpp"
    if model_type not in TRANSFORMERS_READS:
        require_llama_cpp(f"checking a {model_type} GGUF (transformers cannot read it back)")
        return "llama.cpp"
    return "llama.cpp" if gguf_type in QUANT_TYPES and have_llama_cpp() else "transformers"


def llama_quantize(source: Path, target: Path, gguf_type: str, threads: int | None = None) -> None:
    """llama.cpp's ``llama_model_quantize`` from ``source`` (an f16 GGUF) to ``target``."""
    import os

    import llama_cpp

    ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[gguf_type]  # q8_0 is written by gguf-py
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or max(1, (os.cpu_count() or 2) // 2)
    _quiet_llama_cpp()
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0 or not target.is_file():
        raise RuntimeError(f"llama.cpp could not quantise {source.name} to {gguf_type} (status {status})")


def llamacpp_logits(path: Path, inputs: list[list[int]]):
    """float32 logits of every position, computed by llama.cpp on CPU from the same token ids."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    _quiet_llama_cpp()
    n_ctx = max(len(ids) for ids in inputs) + 8
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, seed=0,
                n_gpu_layers=0)
    try:
        out = []
        for ids in inputs:
            llm.reset()
            llm.eval(ids)
            out.append(torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32)))
        return out
    finally:
        llm.close()


def llamacpp_generate(path: Path, prompt: str, max_tokens: int = 16) -> str:
    """A greedy chat completion through the chat template stored in the file (the smoke test users run)."""
    from llama_cpp import Llama

    _quiet_llama_cpp()
    llm = Llama(model_path=str(path), n_ctx=256, verbose=False, seed=0, n_gpu_layers=0)
    try:
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                           temperature=0.0)
        return reply["choices"][0]["message"]["content"] or ""
    finally:
        llm.close()


def _quiet_llama_cpp() -> None:
    """llama.cpp logs every tensor to stderr; keep only its errors (llama_log_set with a filtering callback)."""
    import ctypes

    import llama_cpp

    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        def callback(level, text, _user):
            if level == 4:  # GGML_LOG_LEVEL_ERROR
                import sys

                sys.stderr.write(text.decode(errors="replace"))

        _LOG_CALLBACK = llama_cpp.llama_log_callback(callback)  # kept alive: llama.cpp holds the pointer
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


_LOG_CALLBACK = None
