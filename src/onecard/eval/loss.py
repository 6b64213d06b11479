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
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            with torch.inference_mode():
                logits = model(**model_inputs(batch)).logits
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                    labels.reshape(-1), ignore_index=-100, reduction="sum")
            total_nll += float(nll)
            total_tokens += int((labels != -100).sum())
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": total_tokens}
