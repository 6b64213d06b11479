"""LoRA linear projections that share one input, as one autograd.Function (Unsloth's LoRA_QKV idea).

Per projection p with frozen W_p (out x in), optional frozen bias c_p, adapter A_p (r x in), B_p (out x r),
scale s_p:
    y_p = x W_p^T + c_p + s_p (x A_p^T) B_p^T
Backward, upstream dy_p, with P_p = x A_p^T (N x r, saved) and Q_p = dy_p B_p (N x r):
    dx   = sum_p  dy_p W_p + s_p Q_p A_p          (one N x in buffer, accumulated in place)
    dA_p = s_p Q_p^T x          dB_p = s_p dy_p^T P_p
Why by hand and not peft's LoRA Linear under autograd: peft keeps adapters in fp32 and casts the bf16 input up
per projection (``x.to(lora_A.weight.dtype)``), so on a bf16 model every rank-r matmul runs in fp32 on CUDA
cores, and each projection saves its own fp32 copy of x. On the H200 (Llama 3 8B, LoRA r16, seq 2048, b8) the
fp32 GEMMs and casts of the attention projections took ~15% of a step (bench/profile_gpu.py). Here the adapter
matmuls run in the input's dtype on tensor cores (A and B are cast by the caller, outside this Function, so
autograd returns fp32 gradients to the fp32 master weights -- what autocast does), x is saved once for q, k
and v, and the frozen W get no weight-gradient matmul.

QLoRA: a W may be a bitsandbytes 4-bit ``Params4bit``; it is dequantised right before each matmul
(:func:`dense`) and only the packed tensor is kept for backward.
"""

from __future__ import annotations

import torch


def is_quantized(w) -> bool:
    """A bitsandbytes 4-bit weight (packed codes + quant_state) rather than a dense matrix."""
    return getattr(w, "quant_state", None) is not None


def dense(w, dtype):
    """W as a dense (out x in) matrix of ``dtype``: dequantised when NF4/FP4, else W itself."""
    if not is_quantized(w):
        return w
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(w.data, w.quant_state).to(dtype)


def lin(x, w, a, b, s, bias=None):
    """x W^T + bias + s (x A^T) B^T for 2-D x; returns (out, x A^T or None)."""
    wt = dense(w, x.dtype).t()
    out = x @ wt if bias is None else torch.addmm(bias.to(x.dtype), x, wt)
    if a is None:
        return out, None
    xa = x @ a.t()
    return out.addmm_(xa, b.t(), alpha=s), xa


def lin_backward(dout, x, xa, w, a, b, s, needs, dx=None):
    """(dx, dW, dA, dB) of :func:`lin` given dout; dW only when W needs it. ``dx``: accumulate into it."""
    wd = dense(w, dout.dtype)
    dx = dout @ wd if dx is None else dx.addmm_(dout, wd)
    da = db = dw = None
    if a is not None:
        db_in = dout @ b  # N x r
        dx.addmm_(db_in, a, alpha=s)
        if needs[1]:
            da = (db_in.t() @ x).mul_(s)
        if needs[2]:
            db = (dout.t() @ xa).mul_(s)
    if needs[0]:
        dw = dout.t() @ x
    return dx, dw, da, db


def keep_for_backward(ctx, weights):
    """4-bit weights are frozen parameters: kept by reference on ctx (save_for_backward would drop the
    quant_state they need to be dequantised); returns the list with those replaced by None."""
    ctx.quantized = [w if is_quantized(w) else None for w in weights]
    return [None if is_quantized(w) else w for w in weights]


def restore_weights(ctx, weights):
    return [q if q is not None else w for q, w in zip(ctx.quantized, weights)]


class LoRAProjections(torch.autograd.Function):
    """k projections of one input. Inputs: x, then (W, bias, A, B) per projection; ``scales`` a tuple."""

    @staticmethod
    def forward(ctx, x, scales, *params):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        outs, xas = [], []
        for i, s in enumerate(scales):
            w, bias, a, b = params[4 * i: 4 * i + 4]
            y, xa = lin(x2, w, a, b, s, bias)
            outs.append(y.view(*shape[:-1], y.shape[-1]))
            xas.append(xa)
        weights = keep_for_backward(ctx, params[0::4])
        adapters = [t for i in range(len(scales)) for t in params[4 * i + 2: 4 * i + 4]]
        ctx.save_for_backward(x2, *weights, *adapters, *[t for t in xas])
        ctx.scales, ctx.shape = scales, shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *douts):
        k = len(ctx.scales)
        saved = ctx.saved_tensors
        x2, weights, adapters, xas = saved[0], saved[1:1 + k], saved[1 + k:1 + 3 * k], saved[1 + 3 * k:]
        weights = restore_weights(ctx, weights)
        needs = ctx.needs_input_grad
        grads: list = [None] * (4 * k)
        dx = None
        for i, s in enumerate(ctx.scales):
            if douts[i] is None:
                continue
            dy = douts[i].reshape(-1, douts[i].shape[-1])
            a, b = adapters[2 * i], adapters[2 * i + 1]
            n = (needs[2 + 4 * i], needs[2 + 4 * i + 2], needs[2 + 4 * i + 3])
            dx, dw, da, db = lin_backward(dy, x2, xas[i], weights[i], a, b, s, n, dx)
            grads[4 * i], grads[4 * i + 2], grads[4 * i + 3] = dw, da, db
        dx = None if dx is None else dx.view(ctx.shape)
        return (dx, None, *grads)


def lora_projections(x, parts):
    """``parts``: per projection (W, A, B, scale[, bias]) with A = B = None where no adapter; returns the outputs."""
    flat, scales = [], []
    for p in parts:
        w, a, b, s = p[:4]
        bias = p[4] if len(p) > 4 else None
        flat += [w, bias, a, b]
        scales.append(float(s))
    return LoRAProjections.apply(x, tuple(scales), *flat)


def lora_projections_reference(x, parts):
    """Plain autograd over the same algebra (what peft computes with dropout 0)."""
    outs = []
    for p in parts:
        w, a, b, s = p[:4]
        bias = p[4] if len(p) > 4 else None
        y = x @ dense(w, x.dtype).t()
        if bias is not None:
            y = y + bias
        outs.append(y if a is None else y + s * ((x @ a.t()) @ b.t()))
    return tuple(outs)
