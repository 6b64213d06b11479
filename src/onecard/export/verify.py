"""Verify an export as it is written: logits of the exported model vs the trained model on fixed prompts.

The comparison is the acceptance test of every export (an adapter nobody can load, or a GGUF with a
wrong Q/K permutation, must fail loudly, not ship). Errors are measured in float32 on the same token ids.

Tolerances (``TOLERANCE``), per stored dtype:
- float32: max |Δlogit| ≤ 1e-4 · max(1, max |logit|). Merging ``W + s·B·A`` in fp32 and reading it back is
  exact up to fp32 summation order (measured 8.5e-7 on the tiny test models), so 1e-4 leaves two decades.
- float16 / bfloat16: weights are stored rounded but compared with float32 arithmetic (so the error is the
  export's, not the runtime's); gate: mean |Δlogit| ≤ tol · mean |logit|, tol 0.005 (fp16) and 0.02 (bf16).
  Measured on SmolLM2-135M-Instruct (30 layers, tied embeddings) with a LoRA whose own effect is 0.35 mean
  |Δlogit|: fp16 merged and GGUF 0.0008, bf16 merged 0.0061 -- margins of 6x and 3x; a wrong tensor or Q/K
  permutation gives errors of order 1. The max error is reported but not gated on for 16-bit exports: one
  outlier logit in a 49k vocabulary says little.
- q8_0 read back by transformers (its GGUF loader dequantises, so this is the file's rounding alone; used
  when llama.cpp is not installed): tol 0.08.

Quantised GGUF types are checked in llama.cpp itself (``TOLERANCE_LLAMA_CPP``, same metric), so its kernels'
rounding -- activations quantised to 8 bits for the quantised matmuls -- counts, as it does for the file's users.
Measured on the ``onecard demo`` run (SmolLM2-135M-Instruct + its 20-step LoRA, 75 positions of the fixed
prompts, CPU, llama-cpp-python 0.3.36; the adapter's own effect is 0.73 of mean |logit|, so losing it reads 0.73):

  type    llama.cpp  transformers  top-1 (llama.cpp)  tolerance (llama.cpp)
  f32     0.0006     0.000002      100%               0.005
  f16     0.0013     0.0009        100%               0.005
  bf16    0.0090     0.0063        100%               0.03
  q8_0    0.047      0.026         97.3%              0.12
  q4_k_m  0.186      --            88.0%              0.35

Quantised margins are 2-2.5x, not the 3-6x of the float types: a q4_k_m tolerance wide enough for 6x would
pass a file that lost the adapter. On the tiny random test models the same types stay inside these values.
Whether a quantised file still carries a small adapter is :func:`adapter_check`'s question, not the tolerance's.
"""

from __future__ import annotations

from typing import Any

TOLERANCE = {"float32": 1e-4, "float16": 0.005, "bfloat16": 0.02, "q8_0": 0.08}
TOLERANCE_LLAMA_CPP = {"float32": 0.005, "float16": 0.005, "bfloat16": 0.03, "q8_0": 0.12, "q4_k_m": 0.35}

FIXED_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning a language model on one GPU needs a plan.",
    "1 2 3 4 5 6 7 8 9 10",
]


def fixed_inputs(tokenizer, max_tokens: int = 32) -> list[list[int]]:
    """Token ids of the fixed prompts, plus one chat-templated prompt when the tokenizer has a template."""
    texts = list(FIXED_PROMPTS)
    if getattr(tokenizer, "chat_template", None):
        texts.append(tokenizer.apply_chat_template([{"role": "user", "content": "hello, how are you?"}],
                                                   tokenize=False, add_generation_prompt=True))
    ids = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_tokens] for t in texts]
    return [i for i in ids if i]


def logits_on(model, inputs: list[list[int]]):
    """float32 CPU logits for each prompt (one at a time: no padding to get wrong)."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for ids in inputs:
            x = torch.tensor([ids], device=device)
            out.append(model(input_ids=x).logits[0].float().cpu())
    return out


def compare(reference: list, candidate: list) -> dict[str, float]:
    import torch

    ref, cand = torch.cat(reference), torch.cat(candidate)
    if ref.shape != cand.shape:
        return {"shape_mismatch": 1.0, "max_abs_err": float("inf"), "mean_abs_err": float("inf"),
                "ref_max_abs": float(ref.abs().max()), "ref_mean_abs": float(ref.abs().mean()), "top1_agreement": 0.0}
    diff = (ref - cand).abs()
    return {
        "max_abs_err": float(diff.max()),
        "mean_abs_err": float(diff.mean()),
        "ref_max_abs": float(ref.abs().max()),
        "ref_mean_abs": float(ref.abs().mean()),
        "top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).float().mean()),
        "positions": int(ref.shape[0]),
    }


def judge(errors: dict[str, float], stored_dtype: str, runtime: str = "transformers") -> dict[str, Any]:
    """Add ``tolerance``, ``metric``, ``value``, ``runtime`` and ``passed`` to a :func:`compare` result."""
    tol = (TOLERANCE_LLAMA_CPP if runtime == "llama.cpp" else TOLERANCE)[stored_dtype]
    if stored_dtype == "float32" and runtime != "llama.cpp":
        metric, value = "max_abs_err / max(1, max|logit|)", errors["max_abs_err"] / max(1.0, errors["ref_max_abs"])
    else:
        metric, value = "mean_abs_err / mean|logit|", errors["mean_abs_err"] / max(errors["ref_mean_abs"], 1e-12)
    return {**errors, "stored_dtype": stored_dtype, "runtime": runtime, "metric": metric, "value": value, "tolerance": tol,
            "passed": bool(value <= tol)}


def adapter_check(reference: list, base: list | None, candidate: list) -> dict[str, Any]:
    """How far the adapter moves the logits, and whether the export is nearer the tuned model than the base.

    For quantised GGUF types the rounding can exceed a small adapter's whole effect (SmolLM2 with a LoRA of
    effect 0.35 mean |Δlogit|: q4_k_m's error is 0.91), so the tolerance alone cannot tell whether the adapter
    made it into the file; the export being nearer the tuned logits than the base's still can. Reported, and
    turned into a note when it fails, not gated on: a run whose adapter barely changed the model would fail it
    by chance.
    """
    if base is None:
        return {"adapter_effect_mean_abs": None}
    import torch

    ref, cand, off = torch.cat(reference), torch.cat(candidate), torch.cat(base)
    if cand.shape != ref.shape:
        return {"adapter_effect_mean_abs": float((ref - off).abs().mean()), "nearer_tuned_than_base": False}
    to_base = float((cand - off).abs().mean())
    return {"adapter_effect_mean_abs": float((ref - off).abs().mean()), "mean_abs_err_vs_base": to_base,
            "nearer_tuned_than_base": bool(float((cand - ref).abs().mean()) < to_base)}
