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

DoRA (peft's DoraLinearLayer, with lora_magnitude_vector m, per output feature): a projection given m computes
    z = x W^T + s (x A^T) B^T,   n = ||W + s B A|| per output row (:func:`dora_norm`, a constant: no gradient),
    y = (m/n) z + c
which is peft's ``base(x) + (m/n - 1)(x W^T) + (m/n) s (x A^T) B^T``. Backward: dm = sum over tokens of dy z / n
(fp32), and the LoRA math above runs on dz = dy m/n. z is saved (peft's autograd saves base and LoRA outputs and
more): recomputing it would cost one more GEMM per projection. The scale is applied as z + z (m/n - 1) with
(m/n - 1) in the compute dtype: m/n sits near 1, where bf16's spacing (2^-8..2^-7) would round away the small
magnitude updates DoRA learns; (m/n - 1) keeps them. m stays fp32 (not cast like A and B) for the same reason.
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


def dora_norm(w, a, b, s, rows_per_chunk: int | None = None):
    """||W + s B A||_2 per output row in fp32 (fp64 for fp64 inputs), no gradient (peft detaches it too).
    ``w`` dense (out x in).

    peft forms W + s B A in the weight's dtype after casting W to the adapter's (fp32 on a bf16 model with fp32
    adapters, so fp32 in practice); fp32 here always. Built a block of rows at a time so the fp32 temporary
    stays ~64 MiB instead of a whole out x in matrix."""
    with torch.no_grad():
        out_f, in_f = w.shape
        rows = rows_per_chunk or max(1, (1 << 24) // in_f)
        dt = torch.promote_types(w.dtype, torch.float32)
        af, bf = a.to(dt), b.to(dt)
        norms = [torch.linalg.vector_norm(torch.addmm(w[i:i + rows].to(dt), bf[i:i + rows], af, alpha=s), dim=1)
                 for i in range(0, out_f, rows)]
        return torch.cat(norms)


def dora_scale_minus_one(m, n, dtype):
    """m/n - 1 in ``dtype``, the division in n's (fp32, or fp64) (see the module docstring: why not m/n)."""
    return (m.detach().to(n.dtype) / n - 1.0).to(dtype)


def dora_lin(x, w, a, b, s, m, bias=None):
    """DoRA's y = (m/n) z + bias for 2-D x; returns (y, x A^T, z, n)."""
    wd = dense(w, x.dtype)
    z, xa = lin(x, wd, a, b, s)
    n = dora_norm(wd, a, b, s)
    y = torch.addcmul(z, z, dora_scale_minus_one(m, n, z.dtype))
    if bias is not None:
        y.add_(bias.to(y.dtype))
    return y, xa, z, n


def dora_backward(dy, z, m, n, need_m: bool):
    """(dz, dm) from dy = dL/dy: dz = dy m/n (the LoRA part's upstream), dm = sum_tokens dy z / n."""
    dm = ((dy * z).sum(0, dtype=n.dtype) / n).to(m.dtype) if need_m else None
    return torch.addcmul(dy, dy, dora_scale_minus_one(m, n, dy.dtype)), dm


def keep_for_backward(ctx, weights):
    """4-bit weights are frozen parameters: kept by reference on ctx (save_for_backward would drop the
    quant_state they need to be dequantised); returns the list with those replaced by None."""
    ctx.quantized = [w if is_quantized(w) else None for w in weights]
    return [None if is_quantized(w) else w for w in weights]


def restore_weights(ctx, weights):
    return [q if q is not None else w for q, w in zip(ctx.quantized, weights)]


P = 5  # tensors per projection in LoRAProjections' inputs: W, bias, A, B, magnitude


class LoRAProjections(torch.autograd.Function):
    """k projections of one input. Inputs: x, then (W, bias, A, B, magnitude) per projection; ``scales`` a tuple.
    magnitude None: plain LoRA (nothing extra saved or computed); else DoRA (:func:`dora_lin`)."""

    @staticmethod
    def forward(ctx, x, scales, *params):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        outs, xas, zs, norms = [], [], [], []
        for i, s in enumerate(scales):
            w, bias, a, b, m = params[P * i: P * i + P]
            if m is None:
                (y, xa), z, n = lin(x2, w, a, b, s, bias), None, None
            else:
                y, xa, z, n = dora_lin(x2, w, a, b, s, m, bias)
            outs.append(y.view(*shape[:-1], y.shape[-1]))
            xas.append(xa), zs.append(z), norms.append(n)
        weights = keep_for_backward(ctx, params[0::P])
        adapters = [t for i in range(len(scales)) for t in params[P * i + 2: P * i + 5]]
        ctx.save_for_backward(x2, *weights, *adapters, *xas, *zs, *norms)
        ctx.scales, ctx.shape = scales, shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *douts):
        k = len(ctx.scales)
        saved = ctx.saved_tensors
        x2, weights, adapters = saved[0], saved[1:1 + k], saved[1 + k:1 + 4 * k]
        xas, zs, norms = saved[1 + 4 * k:1 + 5 * k], saved[1 + 5 * k:1 + 6 * k], saved[1 + 6 * k:]
        weights = restore_weights(ctx, weights)
        needs = ctx.needs_input_grad
        grads: list = [None] * (P * k)
        dx = None
        for i, s in enumerate(ctx.scales):
            if douts[i] is None:
                continue
            dy = douts[i].reshape(-1, douts[i].shape[-1])
            a, b, m = adapters[3 * i: 3 * i + 3]
            j = 2 + P * i  # index of this projection's W in needs_input_grad
            if m is not None:
                dy, grads[P * i + 4] = dora_backward(dy, zs[i], m, norms[i], needs[j + 4])
            dx, dw, da, db = lin_backward(dy, x2, xas[i], weights[i], a, b, s, (needs[j], needs[j + 2], needs[j + 3]), dx)
            grads[P * i], grads[P * i + 2], grads[P * i + 3] = dw, da, db
        dx = None if dx is None else dx.view(ctx.shape)
        return (dx, None, *grads)


def unpack_parts(p):
    """(W, A, B, scale[, bias[, magnitude]]) -> (W, A, B, scale, bias, magnitude): the projection tuples the fused
    ops take (patch/modules.py projection_parts builds them)."""
    w, a, b, s = p[:4]
    return w, a, b, s, (p[4] if len(p) > 4 else None), (p[5] if len(p) > 5 else None)


def lora_projections(x, parts):
    """``parts``: per projection (W, A, B, scale[, bias[, magnitude]]) with A = B = None where no adapter and
    magnitude None unless DoRA; returns the outputs."""
    flat, scales = [], []
    for p in parts:
        w, a, b, s, bias, m = unpack_parts(p)
        flat += [w, bias, a, b, m]
        scales.append(float(s))
    return LoRAProjections.apply(x, tuple(scales), *flat)


def lora_projections_reference(x, parts):
    """Plain autograd over the same algebra (what peft computes with dropout 0): DoRA as written in peft."""
    outs = []
    for p in parts:
        w, a, b, s, bias, m = unpack_parts(p)
        wd = dense(w, x.dtype)
        y = x @ wd.t()
        lora = None if a is None else s * ((x @ a.t()) @ b.t())
        if m is not None:
            n = torch.linalg.vector_norm(wd + s * (b @ a).detach(), dim=1).detach()
            y = y + ((m / n - 1) * y + (m / n) * lora).to(y.dtype)
        elif lora is not None:
            y = y + lora
        outs.append(y if bias is None else y + bias)
    return tuple(outs)
