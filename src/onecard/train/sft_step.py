"""SFT's step: the token cross-entropy of one accumulation window, summed and divided by the window's count of
trained tokens (the fused linear-CE kernel computes the same without materialising the logits), and the held-out
eval between steps. train/sft.py runs it; train/graphed_sft.py replays it from a CUDA graph.
"""

from __future__ import annotations

from typing import Any

from onecard.recipe import Recipe
from onecard.train.spine import Step


def token_ce_sum(logits, labels):
    """Summed next-token cross-entropy over trained positions (labels -100 are skipped), and their count."""
    import torch.nn.functional as F

    # Shift the labels, not the logits: logits[:, :-1] is a strided view, so its fp32 upcast and reshape
    # would hold one more batch x seq x vocab block; an fp32 upcast of contiguous logits reshapes as a view.
    shift_labels = F.pad(labels.to(logits.device), (0, 1), value=-100)[:, 1:]
    flat_logits = logits.float().reshape(-1, logits.size(-1))
    loss_sum = F.cross_entropy(flat_logits, shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss_sum, int((shift_labels != -100).sum())


def trained_tokens(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def real_tokens(micro_batches: list[dict]) -> int:
    """Tokens that are not padding, over the micro-batches."""
    return sum(int(b["attention_mask"].sum()) for b in micro_batches)


def micro_batch_loss(model, batch, device: str, fused_items: float | None, objective) -> float:
    """Forward and backward of ``objective(loss)`` for one micro-batch; returns its summed token cross-entropy.

    ``fused_items`` set: the patched model returns summed CE / ``num_items_in_batch`` itself (fused linear-CE, no
    full logits), and ``objective`` gets that. Otherwise it gets the summed CE of the logits. Inputs come from
    ``onecard.data.model_inputs``: packed rows go without the 2-D mask so that transformers keeps packed examples
    apart.
    """
    from onecard.data import model_inputs

    inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in model_inputs(batch).items()}
    inputs.setdefault("use_cache", False)
    if fused_items is not None:
        loss = model(**inputs, labels=batch["labels"].to(device), num_items_in_batch=fused_items).loss
        objective(loss).backward()
        return float(loss.detach()) * fused_items
    logits = model(**inputs).logits
    loss_sum, _ = token_ce_sum(logits, batch["labels"])
    del logits  # not kept alive through backward (notes/bench.md: ~3.9 GiB at Llama 3 8B, b8, seq 2048)
    objective(loss_sum).backward()
    return float(loss_sum.detach())


def accumulate_gradients(model, micro_batches: list[dict[str, Any]], device: str,
                         fused_loss: bool = False) -> tuple[float, int]:
    """Backward over one accumulation window, each micro-batch's summed loss divided by the window's token count.

    Returns (window loss = summed CE / trained tokens, trained tokens). The gradient equals that of one
    big batch holding every example of the window, whatever the micro-batch split.
    """
    window_tokens = max(1, sum(trained_tokens(b) for b in micro_batches))
    if fused_loss:  # the model already divides by num_items_in_batch = the window's token count
        fused_items, objective = window_tokens, (lambda loss: loss)
    else:
        fused_items, objective = None, (lambda loss_sum: loss_sum / window_tokens)
    total = sum(micro_batch_loss(model, batch, device, fused_items, objective) for batch in micro_batches)
    return total / window_tokens, window_tokens


class SFTStep(Step):
    def __init__(self, model, optimizer, recipe: Recipe, device: str, dataset, pad_id: int, fused_loss: bool,
                 tokenizer):
        super().__init__(model, optimizer, recipe, device)
        self.dataset, self.pad_id, self.fused_loss, self.tokenizer = dataset, pad_id, fused_loss, tokenizer

    def collated(self, window: list[list[int]]) -> list[dict]:
        """The window's micro-batches, each right-padded to its longest example (data/collate.py)."""
        from onecard.data import collate

        return [collate([self.dataset.examples[i] for i in idx], self.pad_id) for idx in window]

    def backward(self, window: list[list[int]]) -> dict[str, Any]:
        micro = self.collated(window)
        loss, n_trained = accumulate_gradients(self.model, micro, self.device, self.fused_loss)
        return {"loss": loss, "tokens": real_tokens(micro), "trained_tokens": n_trained}

    def after_step(self, step: int, logger) -> None:
        from onecard.train.summary import eval_if_due

        eval_if_due(self.model, self.tokenizer, self.recipe, step, logger)
