"""The SFT step with every micro-batch's forward and backward replayed from one CUDA graph (train/graphed_step.py).

What changes against :class:`onecard.train.sft_step.SFTStep`, and why each is exact:
- One graph serves one shape, so every micro-batch is right-padded to ``data.seq_len`` and a short micro-batch
  (an epoch's last) gets rows of padding only. Pads carry labels -100, so they add nothing to the loss sum nor to
  the token count.
- The rows go without the 2-D attention mask (the graph runs sdpa's causal kernel with no mask,
  patch/unmasked_causal.py). Right padding needs none: causal attention never lets a real token see the pads
  after it, so every trained token's logits are those of the masked forward -- the same argument as packed rows'
  (data/collate.py ``model_inputs``).
- The window's token count is a GPU tensor the graph reads (``num_items_in_batch``), not a Python number frozen
  into the recording at the first step.
- Gradients are zeroed in place after each optimizer step: the recorded backward adds into those tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from onecard.errors import UserError
from onecard.train.sft_step import SFTStep, real_tokens, trained_tokens


def fixed_batch(batch: dict, rows: int, width: int, pad_id: int) -> dict:
    """A collated batch right-padded to ``rows`` x ``width`` (pads: ``pad_id``, labels -100, mask 0)."""
    n, length = batch["input_ids"].shape
    if length > width or n > rows:
        raise ValueError(f"a micro-batch of {n} x {length} tokens does not fit the recorded {rows} x {width}")
    grow = (0, width - length, 0, rows - n)
    pads = {"input_ids": pad_id, "labels": -100, "attention_mask": 0}
    return {key: torch.nn.functional.pad(batch[key], grow, value=pads[key]) for key in pads}


class GraphedSFTStep(SFTStep):
    """``backward`` records the step at its first micro-batch, then replays it; ``zero_grad`` zeroes in place."""

    graphed = None  # train/graphed_step.GraphedStep, recorded at the first micro-batch

    def backward(self, window: list[list[int]]) -> dict[str, Any]:
        from onecard.train.graphed_step import GraphCaptureError, capture

        rows, width = self.recipe.training.micro_batch_size, self.recipe.data.seq_len
        micro = [fixed_batch(b, rows, width, self.pad_id) for b in self.collated(window)]
        window_tokens = max(1, sum(trained_tokens(b) for b in micro))
        items = torch.tensor(float(window_tokens), device=self.device)
        losses = []
        for batch in micro:
            inputs = {"input_ids": batch["input_ids"].to(self.device), "labels": batch["labels"].to(self.device),
                      "num_items_in_batch": items}
            if self.graphed is None:
                try:
                    self.graphed = capture(self.model, inputs)
                except GraphCaptureError as exc:
                    raise UserError(str(exc), where="training.cuda_graph",
                                    fix="set training.cuda_graph: false (the eager step runs the same maths)") from exc
            losses.append(self.graphed.step(inputs))  # summed CE / window_tokens, on the GPU
        return {"loss": float(torch.stack(losses).sum()), "tokens": real_tokens(micro), "trained_tokens": window_tokens}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)
