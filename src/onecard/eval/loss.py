"""Held-out loss and perplexity, on exactly the examples (template, masking, truncation) training builds."""

from __future__ import annotations

import math
from collections.abc import Callable


def heldout_loss(model, examples: list[dict], pad_id: int, batch_size: int = 8,
                 progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Token-weighted mean cross-entropy over trained tokens (labels != -100) and its exp (perplexity).

    Token-weighted, like training's loss over a whole epoch: a mean of per-example means would let one-token
    answers weigh as much as long ones.
    """
    import torch

    from onecard.data import collate, model_inputs

    if not examples:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0}
    device = next(model.parameters()).device
    lm = _chunked_head_model(model)
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            with torch.inference_mode():
                nll, count = _nll_sum(model, lm, model_inputs(batch), batch["labels"][:, 1:])
            total_nll += float(nll)
            total_tokens += int(count)
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": total_tokens}


def _chunked_head_model(model):
    """The transformers CausalLM whose decoder + linear head the chunked head + CE scores (see :func:`_nll_sum`), or
    None for full logits: heads the fused op does not model, and the CPU, where host RAM holds the logits and
    F.cross_entropy runs ~5x faster than the chunked torch reference (24 rows x 120 tokens, vocabulary 49,152:
    0.93 s against 4.7 s, this 2-core machine)."""
    import torch

    from onecard.patch import base_causal_lm

    lm = base_causal_lm(model)
    head = getattr(lm, "lm_head", None)
    scaled = any(getattr(lm.config, k, None) not in (None, 1, 1.0) for k in ("logit_scale", "logits_scaling"))
    if type(head) is not torch.nn.Linear or not hasattr(lm, "model") or scaled or not head.weight.is_cuda:
        return None
    return lm


def _nll_sum(model, lm, inputs: dict, labels):
    """(sum of next-token NLL over ``labels`` != -100, their count) for one batch; with ``lm`` (a GPU decoder + linear
    head, :func:`_chunked_head_model`) without its (tokens x vocab) logits: the hidden states go through the chunked
    head + CE of kernels/fused_ce.py, whose peak is one chunk of logits. The trap it avoids: at Qwen 2.5 14B's
    vocabulary a batch of 8 x 2048 tokens holds 4.6 GiB of bf16 logits and 9.3 GiB of fp32 ones, which ran out of
    memory beside an FP8 14B training run under a 24 GiB cap though training itself fit
    (bench/results/e2e/train_e2e_14b_fullogits_2026-12-07.json)."""
    import torch

    from onecard.kernels.fused_ce import fused_linear_cross_entropy

    if lm is None:
        logits = model(**inputs).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        return nll, (labels != -100).sum()
    hidden = lm.model(**inputs).last_hidden_state[:, :-1]
    return fused_linear_cross_entropy(hidden, lm.lm_head.weight, labels, bias=lm.lm_head.bias,
                                      softcap=getattr(lm.config, "final_logit_softcapping", None))
