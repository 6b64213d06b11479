"""LoRA linear projections that share one input, as one autograd.Function (Unsloth's LoRA_QKV idea).

Per projection p with frozen W_p (out x in), optional frozen bias c_p, adapter A_p (r x in), B_p (out x r),
scale s_p:
    y_p = x W_p^T + c_p + s_p (x A_p^T) B_p^T
Backward, upstream dy_p, with P_p = s_p x A_p^T (N x r, saved: the scale folded in once, where forward's output
needs it anyway) and Q_p = dy_p B_p (N x r):
    dx   = sum_p  dy_p W_p + s_p Q_p A_p          (one N x in buffer, accumulated in place)
    dA_p = s_p Q_p^T x          dB_p = dy_p^T P_p
Why by hand and not peft's LoRA Linear under autograd: peft keeps adapters in fp32 and casts the bf16 input up
per projection (``x.to(lora_A.weight.dtype)``), so on a bf16 model every rank-r matmul runs in fp32 on CUDA
cores, and each projection saves its own fp32 copy of x. On the H200 (Llama 3 8B, LoRA r16, seq 2048, b8) the
fp32 GEMMs and casts of the attention projections took ~15% of a step (bench/profile_gpu.py). Here the adapter
matmuls run in the input's dtype on tensor cores (A and B are cast by the caller, outside this Function, so
autograd returns fp32 gradients to the fp32 master weights -- what autocast does), x is saved once for q, k
and v, and the frozen W get no weight-gradient matmul.

QLoRA: a W may be a bitsandbytes 4-bit ``Params4bit``; it is dequantised right before each matmul
(:func:`dense`) and only the packed tensor is kept for backward.

DoRA (peft's DoraLinearLayer, with lora_magnitude_vector m, per output feature): with
    z = x W^T + s (x A^T) B^T,   n = ||W + s B A|| per output row (:func:`dora_norm`, a constant: no gradient),
    y = (m/n) z + c
which is peft's ``base(x) + (m/n - 1)(x W^T) + (m/n) s (x A^T) B^T``. Computed as LoRA on row-scaled weights
(:func:`dora_weights`): W_s = (m/n) W and B_s = (m/n) B are (out x in) and (out x r) -- the activations are
(tokens x out), 4x larger at 16k tokens on an 8B model -- so DoRA adds no elementwise pass over the activations
in forward or backward. Backward: dm = sum over tokens of dy z / n = sum dy (y - c) / m, from the *output* y
(saved; gate/up save it anyway for the GLU), dx and dA from LoRA's backward on (W_s, B_s), dB row-scaled by m/n.
m/n stays fp32 and the row scaling is computed in fp32 before its one rounding to bf16: a bf16 m/n (spacing 2^-7
near 1) would round away the small magnitude updates DoRA learns. m stays fp32 (not cast like A and B) for the
same reason. Why the weight is scaled rather than the outputs: scaling the outputs (z + z (m/n - 1)) with
W + s B A formed in fp32 for the norm ran at 0.748x onecard's LoRA speed on the H200 (8B b8,
bench/results/h200-k2.jsonl).

FP8 base: a W may be an e4m3 :class:`~onecard.kernels.fp8.Fp8Weight` (per-output-channel scales). Its frozen GEMMs
(forward, recompute, and dx's dy W) run through torch._scaled_mm on row-wise quantised x and dy (kernels/fp8.py);
x's quantised copy may come from its producer (``x_fp8``: the FP8 RMSNorm), else one Triton pass makes it, once for
all projections of x. The rank-r path stays in the input's dtype. DoRA on an FP8 W dequantises it per use (the bf16
path's speed, correct results).
"""

from __future__ import annotations

import torch

from .fp8 import fp8_forward, fp8_input_grad, is_fp8, quantize_rows


def is_quantized(w) -> bool:
    """A bitsandbytes 4-bit weight (packed codes + quant_state) rather than a dense matrix."""
    return getattr(w, "quant_state", None) is not None


def dense(w, dtype):
    """W as a dense (out x in) matrix of ``dtype``: dequantised when NF4/FP4, else W itself."""
    if is_fp8(w):
        return w.dequantize(dtype)
    if not is_quantized(w):
        return w
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(w.data, w.quant_state).to(dtype)


def lora_first(d_in: int, d_out: int) -> bool:
    """Order of a LoRA projection's forward: the rank-r path first, into the output, then the frozen GEMM added onto
    it (cuBLAS beta=1: the compute-bound GEMM reads the output in its epilogue), or the frozen GEMM first, then a
    K=r matmul that reads and writes the whole output (memory-bound). Measured on the H200 at 16k tokens
    (bench/lora_order_gpu.py, bench/results/lora_order_2026-11-28.json): rank-r first is faster unless the output is
    a quarter of the input or narrower (gate/up 2.93 vs 3.21 ms, q/o 0.83 vs 0.88, down 3.01 vs 3.04); for the
    narrow k/v outputs the frozen GEMM first is (0.29 vs 0.32 ms)."""
    return 4 * d_out > d_in


def out_features(w) -> int:
    return int(w.quant_state.shape[0]) if is_quantized(w) else int(w.shape[0])


def scaled_in_place(t, s: float):
    """t * s in place; no kernel when s is 1 (alpha = r)."""
    return t if s == 1.0 else t.mul_(s)


def lin(x, w, a, b, s, bias=None, x_fp8=None):
    """x W^T + bias + s (x A^T) B^T for 2-D x; returns (out, s x A^T or None)."""
    xas = None if a is None else scaled_in_place(x @ a.t(), s)
    return lin_from(x, w, xas, b, bias, x_fp8), xas


def rank_r_output(xas, b, bias, dtype):
    """xas B^T + bias, the output a frozen GEMM then adds onto (xas = s x A^T)."""
    return xas @ b.t() if bias is None else torch.addmm(bias.to(dtype), xas, b.t())


def lin_from(x, w, xas, b, bias=None, x_fp8=None):
    """x W^T + bias + xas B^T, the scaled rank-r product xas = s x A^T given (None: no adapter), in
    :func:`lora_first`'s order. An FP8 W (on ``x_fp8`` if given): always the rank-r part first, the FP8 GEMM adding
    onto it in its epilogue (kernels/cublaslt.py), which costs less than either order's separate pass over the
    output."""
    if is_fp8(w):
        if xas is None:
            return fp8_forward(x, w, x_fp8, bias)
        return fp8_forward(x, w, x_fp8, out=rank_r_output(xas, b, bias, x.dtype))
    wt = dense(w, x.dtype).t()
    if xas is not None and lora_first(wt.shape[0], wt.shape[1]):
        return rank_r_output(xas, b, bias, x.dtype).addmm_(x, wt)
    out = x @ wt if bias is None else torch.addmm(bias.to(x.dtype), x, wt)
    return out if xas is None else out.addmm_(xas, b.t())


def scale_column_blocks(t, widths, scales):
    """t with its column blocks (``widths`` wide) times their ``scales``, in place: one pass when the scales agree
    (they do unless rank or alpha patterns differ per module)."""
    if all(s == scales[0] for s in scales):
        return scaled_in_place(t, scales[0])
    for block, s in zip(t.split(widths, dim=1), scales):
        scaled_in_place(block, s)
    return t


def rank_products(x, adapters, scales):
    """s_p x A_p^T for every adapter A_p (None: no adapter) of projections sharing x, as one matmul over the
    concatenated A, so x is read once rather than once per projection, scaled in one pass where it can be
    (:func:`scale_column_blocks`); returns (that product or None, its column block per projection)."""
    present = [(a, s) for a, s in zip(adapters, scales) if a is not None]
    if not present:
        return None, [None] * len(adapters)
    xa = x @ (present[0][0] if len(present) == 1 else torch.cat([a for a, _ in present])).t()
    scale_column_blocks(xa, [a.shape[0] for a, _ in present], [s for _, s in present])
    return xa, rank_product_blocks(xa, adapters)


def rank_product_blocks(xa, adapters):
    """:func:`rank_products`' column blocks of ``xa`` (r_p wide, None where no adapter): backward saves the one
    product and splits it again, rather than saving each block (each saved tensor costs a checkpoint's hooks)."""
    if xa is None:
        return [None] * len(adapters)
    pieces = iter(xa.split([a.shape[0] for a in adapters if a is not None], dim=1))
    return [None if a is None else next(pieces) for a in adapters]


def shared_input_forward(x, projs, scales, x_fp8=None):
    """Projections of one 2-D input, ``projs`` = (W, bias, A, B, magnitude) each: (outputs, the rank-r product
    s x A^T of all adapters (:func:`rank_products`), DoRA norms). DoRA projections run as LoRA on their row-scaled
    (W_s, B_s) (:func:`dora_weights`). FP8 weights share one row-wise quantised x (``x_fp8`` from x's producer,
    else made here)."""
    eff = [(w, b, None) if m is None else dora_weights(w, a, b, s, m, x.dtype)
           for (w, _, a, b, m), s in zip(projs, scales)]
    if x_fp8 is None and any(is_fp8(we) for we, _, _ in eff):
        x_fp8 = quantize_rows(x)
    xa, xas = rank_products(x, [p[2] for p in projs], scales)
    outs = [lin_from(x, we, xa_p, be, p[1], x_fp8) for p, (we, be, _), xa_p in zip(projs, eff, xas)]
    return outs, xa, [n for _, _, n in eff]


def skipped_forward(x, projs):
    """Uninitialised outputs of the shapes :func:`shared_input_forward` returns (``skip_output``)."""
    return [x.new_empty(x.shape[0], out_features(w)) for w, *_ in projs]


def shared_input_backward(douts, x, xas, outs, norms, projs, scales, needs, dy_fp8=None):
    """Backward of :func:`shared_input_forward`: (dx, per projection [dW, dA, dB, dm]); ``needs`` per projection
    for (W, A, B, m); ``douts`` entries may be None (output unused). ``outs``: DoRA outputs (for dm) or None.

    Per adapter p, Q_p = s_p dy_p B_p (N x r). dx = [Q_p]_p [A_p]_p (one K = sum r matmul, written first) plus
    sum_p dy_p W_p (each added onto dx by its GEMM, beta=1: lora_first; FP8 too, kernels/cublaslt.py);
    dA = [Q_p]_p^T x (x read once);
    dB_p = dy_p^T (s_p x A_p^T) (``xas``). DoRA: B_s and W_s in place of B and W, dB and dW row-scaled by m/n, dm from
    the output. An FP8 W (not DoRA): dy_p W_p through :func:`~onecard.kernels.fp8.fp8_input_grad`, on
    ``dy_fp8[p]`` (rowquant(dy_p diag(s_p)) from dy's producer) when given."""
    grads = [[None] * 4 for _ in projs]
    live = [i for i, d in enumerate(douts) if d is not None]
    ranked = [i for i in live if projs[i][2] is not None]
    ratios = {i: dora_ratio(projs[i][4], norms[i]) for i in live if projs[i][4] is not None}
    for i in ratios:
        if needs[i][3]:
            grads[i][3] = dora_magnitude_grad(douts[i], outs[i], projs[i][4], norms[i], projs[i][1])
    dx = None
    # the rank-r product first, the frozen GEMMs adding onto it (bf16: cuBLAS beta = 1, lora_first; FP8: cuBLASLt's)
    if ranked:
        bs = [row_scaled(projs[i][3], ratios[i], projs[i][3]) if i in ratios else projs[i][3] for i in ranked]
        q = scale_column_blocks(torch.cat([douts[i] @ b for i, b in zip(ranked, bs)], dim=1),
                                [b.shape[1] for b in bs], [scales[i] for i in ranked])
        dx = q @ torch.cat([projs[i][2] for i in ranked])
        if any(needs[i][1] for i in ranked):
            for i, da in zip(ranked, (q.t() @ x).split([projs[i][2].shape[0] for i in ranked])):
                grads[i][1] = da if needs[i][1] else None
        for i in ranked:
            if needs[i][2]:
                db = douts[i].t() @ xas[i]
                grads[i][2] = db.mul_(ratios[i]) if i in ratios else db
    for i in live:
        if is_fp8(projs[i][0]) and i not in ratios:
            dx = fp8_input_grad(douts[i], projs[i][0], None if dy_fp8 is None else dy_fp8[i], out=dx)
            continue
        w = dense(projs[i][0], douts[i].dtype)
        if i in ratios:
            w = row_scaled(w, ratios[i], projs[i][0])
        dx = douts[i] @ w if dx is None else dx.addmm_(douts[i], w)
        del w
        if needs[i][0]:
            dw = douts[i].t() @ x
            grads[i][0] = dw.mul_(ratios[i]) if i in ratios else dw
    return dx, grads


def row_sq_norms(w, dtype) -> torch.Tensor:
    """||W_i||^2 per output row in ``dtype``, built 64 MiB of rows at a time (no whole fp32 copy of W)."""
    rows = max(1, (1 << 24) // w.shape[1])
    return torch.cat([w[i:i + rows].to(dtype).square().sum(1) for i in range(0, w.shape[0], rows)])


def _cached_row_sq_norms(key, w, dtype):
    """:func:`row_sq_norms` of the frozen W, computed once per weight: W never changes during adapter training.
    Kept on ``key`` (the weight parameter, or the packed NF4 one) with its version, so an in-place change of W
    (merging, loading) recomputes it. An FP8 weight caches on its e4m3 codes."""
    key = key.qdata if is_fp8(key) else key
    tag = (key._version, key.data_ptr(), dtype)
    cached = getattr(key, "_onecard_row_sq", None)
    if cached is None or cached[0] != tag:
        cached = (tag, row_sq_norms(w, dtype))
        try:
            key._onecard_row_sq = cached
        except (AttributeError, RuntimeError):  # a tensor that takes no attributes: just don't cache
            pass
    return cached[1]


def dora_norm(w, a, b, s, key=None):
    """||W + s B A||_2 per output row in fp32 (fp64 for fp64 inputs), no gradient (peft detaches it too).
    ``w`` dense (out x in); ``key``: the weight parameter to cache ||W_i||^2 on (None: not cached).

    Expanded instead of formed: ||W_i + s B_i A||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T.
    ||W_i||^2 is constant (W is frozen) and cached; W A^T is one (out x r) matmul that reads W once in its own
    dtype (tensor cores); the rest is r x r. peft forms W + s B A in fp32 (an out x in fp32 temporary and ~5
    passes over it per projection and forward: ~45 ms per 8B forward on the H200, twice per step with
    checkpointing). The expansion loses precision only when W + s B A nearly cancels W, which LoRA-sized
    updates do not do."""
    with torch.no_grad():
        dt = torch.promote_types(w.dtype, torch.float32)
        w_sq = row_sq_norms(w, dt) if key is None else _cached_row_sq_norms(key, w, dt)
        af, bf = a.to(dt), b.to(dt)
        wa = (w @ a.to(w.dtype).t()).to(dt)  # out x r
        n_sq = w_sq + (2 * s) * (wa * bf).sum(1) + (s * s) * ((bf @ (af @ af.t())) * bf).sum(1)
        return n_sq.clamp_min_(0).sqrt_()


def dora_divisor(m):
    """m with exact zeros moved to 1e-30: the scale m/n is then ~0 in forward (a ~1e-30 z/n output, which bf16's
    fp32-sized exponent holds), and backward's y/m still recovers z/n for the magnitude's gradient."""
    m = m.detach()
    return torch.where(m == 0, torch.full_like(m, 1e-30), m)


def dora_ratio(m, n):
    """m/n per output row, as an (out x 1) column in n's dtype (fp32, or fp64)."""
    return (dora_divisor(m).to(n.dtype) / n)[:, None]


def row_scaled(t, ratio, original):
    """ratio x t in t's dtype, the product taken in ratio's (fp32): in place when t is a temporary (a dequantised
    copy, not ``original``), else into a new tensor."""
    return t.mul_(ratio) if t is not original else torch.mul(t, ratio, out=torch.empty_like(t))


def dora_weights(w, a, b, s, m, dtype, n=None):
    """(W_s, B_s, n): DoRA as LoRA on row-scaled weights, W_s = (m/n) W and B_s = (m/n) B, so that
    x W_s^T + s (x A^T) B_s^T = (m/n) z with no pass over the activations. The product is taken in fp32 (m/n
    stays fp32; torch computes a bf16 x fp32 product in fp32 and rounds once into the bf16 result), so magnitude
    updates far below bf16's spacing near 1 still move W_s's rows on average. ``n``: the norm if known (backward
    reuses forward's). For an NF4 W the dequantised copy is scaled in place."""
    wd = dense(w, dtype)
    if n is None:
        n = dora_norm(wd, a, b, s, key=w)
    ratio = dora_ratio(m, n)
    return row_scaled(wd, ratio, w), row_scaled(b, ratio, b), n


def dora_lin(x, w, a, b, s, m, bias=None):
    """DoRA's y = (m/n) z + bias for 2-D x (z = x W^T + s (x A^T) B^T); returns (y, s x A^T, n)."""
    ws, bs, n = dora_weights(w, a, b, s, m, x.dtype)
    y, xa = lin(x, ws, a, bs, s, bias)
    return y, xa, n


def dora_magnitude_grad(dy, y, m, n, bias=None):
    """dL/dm = sum over tokens of dy z / n = sum dy (y - bias) / m (y = (m/n) z + bias), in n's dtype."""
    dot = (dy * y).sum(0, dtype=n.dtype)
    if bias is not None:
        dot = dot - bias.detach().to(n.dtype) * dy.sum(0, dtype=n.dtype)
    return (dot / dora_divisor(m).to(n.dtype)).to(m.dtype)


def keep_for_backward(ctx, weights, adapters):
    """The frozen W and the adapters' A and B, kept on ctx by reference rather than saved. Every saved tensor costs
    a checkpoint three hook calls a step (pack in forward, pack in the recompute, unpack in backward), ~30 Python
    calls each, and these tensors outlive the step anyway: each W is a parameter (a streamed layer's is bound to
    its slot again before its backward, patch/stream_weights.py), and the A and B a training forward uses are its
    compute copies (patch/adapter_copies.py; cast per use they are rank x features, small). 4-bit W could not be
    saved at all: save_for_backward drops the quant_state they need. Nothing writes any of them in place before
    backward (the optimizer steps after it), so save_for_backward's version check has nothing to catch."""
    ctx.weights, ctx.adapters = tuple(weights), tuple(adapters)


P = 5  # tensors per projection in LoRAProjections' inputs: W, bias, A, B, magnitude


class LoRAProjections(torch.autograd.Function):
    """k projections of one input. Inputs: x, then (W, bias, A, B, magnitude) per projection; ``scales`` a tuple.
    magnitude None: plain LoRA (nothing extra saved or computed); else DoRA (:func:`dora_lin`: its output is saved
    for the magnitude's gradient -- a view of what is returned, no extra memory)."""

    @staticmethod
    def forward(ctx, x, scales, skip_output, x_fp8, *params):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        projs = [params[P * i: P * i + P] for i in range(len(scales))]  # (W, bias, A, B, magnitude)
        if skip_output and all(p[4] is None for p in projs):
            ys, norms = skipped_forward(x2, projs), [None] * len(projs)
            xa, _ = rank_products(x2, [p[2] for p in projs], scales)
        else:
            ys, xa, norms = shared_input_forward(x2, projs, scales, x_fp8)
        dora_outs = [y if p[4] is not None else None for y, p in zip(ys, projs)]
        keep_for_backward(ctx, params[0::P], [t for p in projs for t in p[2:4]])
        # the bias only for DoRA's magnitude gradient (fewer saved tensors: each costs checkpoint hooks)
        dora = [t for p in projs for t in ((p[1], p[4]) if p[4] is not None else (None, None))]
        ctx.save_for_backward(x2, xa, *dora, *dora_outs, *norms)
        ctx.scales, ctx.shape = scales, shape
        return tuple(y.view(*shape[:-1], y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx, *douts):
        k = len(ctx.scales)
        saved = ctx.saved_tensors
        x2, xa, dora = saved[0], saved[1], saved[2:2 + 2 * k]
        outs, norms = saved[2 + 2 * k:2 + 3 * k], saved[2 + 3 * k:]
        weights, adapters = ctx.weights, ctx.adapters
        projs = [(weights[i], dora[2 * i], adapters[2 * i], adapters[2 * i + 1], dora[2 * i + 1]) for i in range(k)]
        xas = rank_product_blocks(xa, adapters[0::2])
        needs = [tuple(ctx.needs_input_grad[4 + P * i + j] for j in (0, 2, 3, 4)) for i in range(k)]
        dys = [None if d is None else d.reshape(-1, d.shape[-1]) for d in douts]
        dx, per_proj = shared_input_backward(dys, x2, xas, outs, norms, projs, ctx.scales, needs)
        grads = [g for dw, da, db, dm in per_proj for g in (dw, None, da, db, dm)]
        return (None if dx is None else dx.view(ctx.shape), None, None, None, *grads)


def unpack_parts(p):
    """(W, A, B, scale[, bias[, magnitude]]) -> (W, A, B, scale, bias, magnitude): the projection tuples the fused
    ops take (patch/modules.py projection_parts builds them)."""
    w, a, b, s = p[:4]
    return w, a, b, s, (p[4] if len(p) > 4 else None), (p[5] if len(p) > 5 else None)


def lora_projections(x, parts, skip_output: bool = False, x_fp8=None):
    """``parts``: per projection (W, A, B, scale[, bias[, magnitude]]) with A = B = None where no adapter and
    magnitude None unless DoRA; returns the outputs.

    ``skip_output``: the caller will not read the outputs (a checkpoint's recompute of a block whose last op this
    is: patch/recompute.py): they come back uninitialised, with no frozen GEMM or lora_B matmul run, while the
    tensors saved for backward are the same as in a full forward (torch's checkpoint compares them). DoRA
    projections save their output for the magnitude's gradient, so they always run.

    ``x_fp8``: x's row-wise e4m3 copy (q (N x in), scale (N x 1)) from x's producer, for FP8 weights."""
    flat, scales = [], []
    for p in parts:
        w, a, b, s, bias, m = unpack_parts(p)
        flat += [w, bias, a, b, m]
        scales.append(float(s))
    return LoRAProjections.apply(x, tuple(scales), bool(skip_output), x_fp8, *flat)


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
