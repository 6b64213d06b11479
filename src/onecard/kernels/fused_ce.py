"""Cross-entropy fused with the LM head, chunked over tokens: no (tokens x vocab) fp32 logits.

Plain transformers computes ``logits = hidden @ W.T`` for every token, upcasts them to fp32 and
keeps them for backward: at Llama 3 8B shape (vocab 128,256), 16,384 tokens that is 8.4 GB of fp32
logits plus their gradient. Here the tokens are processed ``chunk_size`` rows at a time and, as in
Liger-Kernel's ``fused_linear_cross_entropy``, the gradients are computed *during the forward*
(the softmax of a chunk is at hand then) and stored; backward only scales them by the upstream
gradient. Per chunk: one matmul for the logits, one elementwise pass for loss and gradient, two
matmuls for dh = G W and dW += G^T h.

The elementwise pass is a Triton kernel (``_ce_rows``, modelled on Liger-Kernel's
``liger_cross_entropy_kernel``): one program per row, pass 1 an online max + sum-exp over vocab
blocks, pass 2 writes softmax - onehot *in place over the logits* in their own dtype (bf16), so a
chunk needs no fp32 copy. The torch reference (``ce_rows_reference``: upcast, logsumexp, gather,
exp, scatter_add, mask, cast back) makes about 8 passes over a 263 MB fp32 chunk (512 rows x
128,256) and allocates it: 32 chunks x ~2.1 GB per 16k-token step, estimated ~15-20 ms on an H200
(4.8 TB/s HBM). The kernel reads the 131 MB bf16 chunk twice and writes it once: estimated ~3 ms
per step at the same bandwidth (neither figure measured yet). The reference runs where Triton
cannot (CPU without TRITON_INTERPRET, float64 tests). Peak extra memory: one chunk of logits in
the compute dtype (fp32 on the reference path) plus grad_hidden (same size as hidden).

Why not liger's op: liger-kernel is not installed on the GPU machine and its op returns a mean;
the trainer needs the *sum* and the count, to normalise by the trained tokens of a whole
grad-accumulation window.

Backward derivation (per token, logits z, label y, p = softmax(z)):
    loss = logsumexp(z) - z_y          dloss/dz = p - onehot(y)
With Gemma 2 soft-capping z = c * tanh(l / c) of the raw logits l = h W^T:
    dz/dl = 1 - tanh^2(l / c) = 1 - (z / c)^2     (the kernel: 4 sigmoid(2l/c) sigmoid(-2l/c), same value)
Then for raw-logit gradient G (rows x vocab): dh = G W and dW = G^T h. Ignored tokens get G = 0.
"""

from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON, next_power_of_2, use_triton

# Launch: vocab blocks of 4096 with 16 warps. Chosen from ptxas -v on the Triton 3.6 PTX for sm_90
# (bf16, vocab 128,256): 54-60 registers, no spills, so 2 programs (32 warps) fit per SM. Liger's
# setting (block 32,768, 32 warps) spills 640-1,200 bytes per thread there; 8192 x 16 warps uses 108
# registers (1 program per SM). Static counts only: not yet timed on the H200.
_MAX_BLOCK = 4096
_WARPS = 16
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0  # tanh via sigmoid (portable across Triton versions, as glu.py)

    @triton.jit
    def _sech2(x):
        # 1 - tanh^2(x) = 4 sigmoid(2x) sigmoid(-2x): no cancellation where tanh saturates (1 - t*t in
        # fp32 loses all digits once |t| > 1 - 6e-8, i.e. |x| > ~8.7, where the torch reference rounds to 0)
        return 4.0 * tl.sigmoid(2.0 * x) * tl.sigmoid(-2.0 * x)

    @triton.jit
    def _ce_rows(
        LOGITS, Y, LOSS, stride, n_cols, ignore_index, softcap,
        HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, N_BLOCKS: tl.constexpr,
    ):
        """Row loss (fp32) to LOSS; d loss / d raw logits over the row of LOGITS, in place.

        The block count is a constexpr (one compile per vocab size) because Triton 3.6's CPU
        interpreter cannot take a runtime ``range`` bound with numpy 2 (``int()`` of a 1-element array).
        """
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride
        offs = tl.arange(0, BLOCK)
        y = tl.load(Y + row).to(tl.int64)
        if y == ignore_index:
            for i in range(0, N_BLOCKS):
                cols = i * BLOCK + offs
                tl.store(base + cols, tl.zeros((BLOCK,), dtype=tl.float32).to(LOGITS.dtype.element_ty),
                         mask=cols < n_cols)
            tl.store(LOSS + row, 0.0)
        else:
            m = float("-inf")  # pass 1: running max and sum of exp(z - m) (online softmax)
            d = 0.0
            for i in range(0, N_BLOCKS):
                cols = i * BLOCK + offs
                mask = cols < n_cols
                z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    z = softcap * _tanh(z / softcap)
                z = tl.where(mask, z, float("-inf"))
                m_new = tl.maximum(m, tl.max(z, axis=0))
                d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m = m_new
            lse = m + tl.log(d)
            # a label outside [0, vocab) gives a NaN loss (loud) instead of reading out of bounds
            z_y = tl.load(base + y, mask=(y >= 0) & (y < n_cols), other=float("nan")).to(tl.float32)
            if HAS_SOFTCAP:
                z_y = softcap * _tanh(z_y / softcap)
            tl.store(LOSS + row, lse - z_y)
            for i in range(0, N_BLOCKS):  # pass 2: softmax - onehot, over the logits
                cols = i * BLOCK + offs
                mask = cols < n_cols
                z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    x = z / softcap
                    z = softcap * _tanh(x)
                g = tl.exp(z - lse)
                g = tl.where(cols == y, g - 1.0, g)
                if HAS_SOFTCAP:
                    g = g * _sech2(x)
                tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


def _chunk_rows(n_rows: int, hidden: int, vocab: int) -> int:
    """Liger's rule: about as many chunks as vocab/hidden, so a chunk's logits ~ the hidden states' size."""
    n_chunks = max(1, math.ceil(vocab / max(hidden, 1)))
    rows = math.ceil(n_rows / n_chunks)
    return max(1, 1 << (rows - 1).bit_length())


def _ce_rows_triton(logits, y, ignore_index, softcap, block=None):
    """Per-row fp32 losses; ``logits`` (rows x vocab, unit column stride) is overwritten by its gradient."""
    n_rows, n_cols = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("logits must have unit column stride (the kernel writes the gradient in place)")
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = block or min(next_power_of_2(n_cols), _MAX_BLOCK)
    warps = _WARPS if block >= 4096 else 8 if block >= 2048 else 4
    _ce_rows[(n_rows,)](
        logits, y.contiguous(), loss, logits.stride(0), n_cols, int(ignore_index), float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None, BLOCK=block, N_BLOCKS=triton.cdiv(n_cols, block), num_warps=warps,
    )
    return loss


def ce_rows_reference(logits, y, ignore_index, softcap):
    """(per-row loss, gradient wrt the raw logits) in fp32 (fp64 for fp64 logits); ignored rows 0.

    fp32/fp64 logits are overwritten (the upcast is then a no-op and the gradient is built in place)."""
    acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 in float64 tests
    z = logits.to(acc)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    lse = torch.logsumexp(z, dim=-1)
    z_y = z.gather(1, y_safe.unsqueeze(1)).squeeze(1)
    loss_rows = (lse - z_y) * valid
    # grad = softmax - onehot, in place on z to keep one chunk-sized fp32 buffer
    grad = z.sub_(lse.unsqueeze(1)).exp_()
    grad.scatter_add_(1, y_safe.unsqueeze(1), -torch.ones_like(z_y).unsqueeze(1))
    grad.mul_(valid.unsqueeze(1))
    if softcap is not None:
        capped = torch.tanh(logits.to(acc) / softcap)
        grad.mul_(1.0 - capped * capped)
    return loss_rows, grad


def ce_rows(logits, y, ignore_index=-100, softcap=None):
    """(per-row loss, gradient wrt the raw logits); ``logits`` may be overwritten. Triton where it can
    run: the gradient is then ``logits`` itself, in its dtype; else the torch reference (fp32 or fp64)."""
    if use_triton(logits, y) and logits.dtype in _KERNEL_DTYPES:
        return _ce_rows_triton(logits, y, ignore_index, softcap), logits
    return ce_rows_reference(logits, y, ignore_index, softcap)


def _chunk_loss_and_grad(h, weight, bias, y, ignore_index, softcap):
    """fp32 loss sum of a chunk and the gradient wrt its raw logits (in h's dtype)."""
    logits = h @ weight.t()
    if bias is not None:
        logits = logits + bias
    loss_rows, grad = ce_rows(logits, y, ignore_index, softcap)
    return loss_rows.sum(), grad.to(h.dtype), (y != ignore_index).sum()


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
