"""Cross-entropy fused with the LM head, chunked over tokens: no (tokens x vocab) fp32 logits.

Plain transformers computes ``logits = hidden @ W.T`` for every token, upcasts them to fp32 and
keeps them for backward: at Llama 3 8B shape (vocab 128,256), 16,384 tokens that is 8.4 GB of fp32
logits plus their gradient. Here the tokens are processed ``chunk_size`` rows at a time and, as in
Liger-Kernel's ``fused_linear_cross_entropy``, the gradients are computed *during the forward*
(the softmax of a chunk is at hand then) and stored; backward only scales them by the upstream
gradient. Peak extra memory is one chunk of fp32 logits plus grad_hidden (same size as hidden).

Why not liger's op: liger-kernel is not installed on the GPU machine and its op returns a mean;
the trainer needs the *sum* and the count, to normalise by the trained tokens of a whole
grad-accumulation window. The work is two matmuls per chunk, so pure torch is at the roofline.

Backward derivation (per token, logits z, label y, p = softmax(z)):
    loss = logsumexp(z) - z_y          dloss/dz = p - onehot(y)
With Gemma 2 soft-capping z = c * tanh(l / c) of the raw logits l = h W^T:
    dz/dl = 1 - tanh^2(l / c) = 1 - (z / c)^2
Then for raw-logit gradient G (rows x vocab): dh = G W and dW = G^T h. Ignored tokens get G = 0.
"""

from __future__ import annotations

import math

import torch


def _chunk_rows(n_rows: int, hidden: int, vocab: int) -> int:
    """Liger's rule: about as many chunks as vocab/hidden, so a chunk's logits ~ the hidden states' size."""
    n_chunks = max(1, math.ceil(vocab / max(hidden, 1)))
    rows = math.ceil(n_rows / n_chunks)
    return max(1, 1 << (rows - 1).bit_length())


def _chunk_loss_and_grad(h, weight, bias, y, ignore_index, softcap):
    """fp32 loss sum of a chunk and the gradient wrt its raw logits (in h's dtype)."""
    logits = h @ weight.t()
    if bias is not None:
        logits = logits + bias
    acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 in float64 tests
    z = logits.to(acc)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    lse = torch.logsumexp(z, dim=-1)
    z_y = z.gather(1, y_safe.unsqueeze(1)).squeeze(1)
    loss_sum = ((lse - z_y) * valid).sum()
    # grad = softmax - onehot, in place on z to keep one chunk-sized fp32 buffer
    grad = z.sub_(lse.unsqueeze(1)).exp_()
    grad.scatter_add_(1, y_safe.unsqueeze(1), -torch.ones_like(z_y).unsqueeze(1))
    grad.mul_(valid.unsqueeze(1))
    if softcap is not None:
        capped = torch.tanh(logits.to(acc) / softcap)
        grad.mul_(1.0 - capped * capped)
    return loss_sum, grad.to(h.dtype), valid.sum()


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token losses of ``hidden @ weight.T`` vs ``labels``; gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk_size, softcap):
        n_rows, dim = hidden.shape
        rows = chunk_size or _chunk_rows(n_rows, dim, weight.shape[0])
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(hidden.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        count = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, n_rows, rows):
            h = hidden[start : start + rows]
            l_sum, g, n = _chunk_loss_and_grad(h, weight, bias, labels[start : start + rows], ignore_index, softcap)
            loss += l_sum
            count += n
            if need_h:
                grad_h[start : start + rows] = g @ weight
            if need_w:
                grad_w.add_(g.t() @ h)  # fp32 accumulator across chunks
            if need_b:
                grad_b += g.to(acc).sum(0)
        ctx.save_for_backward(
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        ctx.mark_non_differentiable(count)
        return loss, count

    @staticmethod
    def backward(ctx, grad_loss, _grad_count):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_loss
        out_h = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        out_w = grad_w * scale.to(grad_w.dtype) if grad_w is not None else None
        out_b = grad_b * scale.to(grad_b.dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    reduction: str = "sum",
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, count): the sum (or mean) over non-ignored tokens of CE(hidden @ W.T [+ b], labels).

    ``hidden`` is (..., H) and ``labels`` (...,) already aligned (label i is the target of row i:
    shift before calling). ``count`` is the number of non-ignored tokens (int64, no grad). With
    ``reduction="sum"`` the caller divides by its own token count (e.g. over grad accumulation).
    ``softcap``: Gemma 2's ``final_logit_softcapping`` (logits -> c * tanh(logits / c)).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h2.device)
    if y.shape[0] != h2.shape[0]:
        raise ValueError(f"labels hold {y.shape[0]} tokens but hidden holds {h2.shape[0]}")
    loss, count = FusedLinearCrossEntropy.apply(h2, lm_head_weight, bias, y, ignore_index, chunk_size, softcap)
    if reduction == "mean":
        loss = loss / count.clamp(min=1)
    return loss, count


def reference_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="sum", softcap=None, bias=None):
    """The unfused path, as transformers computes it: full logits, upcast to fp32, then CE."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # .float(), but keeps float64
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    y = labels.reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
    count = (y != ignore_index).sum()
    if reduction == "mean":
        loss = loss / count.clamp(min=1)
    return loss, count
