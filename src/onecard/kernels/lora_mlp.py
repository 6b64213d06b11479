"""The gated MLP with LoRA on gate/up/down as one autograd.Function (Unsloth's LoRA_MLP idea).

Per projection p with frozen W_p (out x in), adapter A_p (r x in), B_p (out x r), scale s_p:
    lin_p(x) = x W_p^T + s_p (x A_p^T) B_p^T
    g = lin_g(x),  u = lin_u(x),  h = act(g) * u,  y = lin_d(h)
Saved for backward: x, g, u and the rank-r products x A^T (tiny). h is *recomputed* in backward by
the fused GLU kernel together with dg, du, so the intermediate-sized act(g) and h are not kept
(transformers + peft keep g, u, act(g), act(g)*u and the dropout inputs: ~2 more tensors).

Backward, upstream dy (N x H), with P = h A_d^T (N x r):
    dB_d = s_d dy^T P                 dA_d = s_d (dy B_d)^T h
    dh   = dy W_d + s_d (dy B_d) A_d
    (h, dg, du) = glu_backward(dh, g, u)            [dg = dh u act'(g),  du = dh act(g)]
    dB_g = s_g dg^T (x A_g^T)          dA_g = s_g (dg B_g)^T x          (same for up)
    dx   = dg W_g + s_g (dg B_g) A_g + du W_u + s_u (du B_u) A_u
Frozen W get no gradient and none of the (out x in) weight-gradient matmuls run: that is the saving
over autograd, which still builds the graph through the base layers. A projection without an
adapter passes A = B = None. LoRA dropout is not modelled: callers use this only when it is 0.

QLoRA: a frozen W may be a bitsandbytes NF4 ``Params4bit`` (it carries ``quant_state``). It is dequantised
to the compute dtype right before each use -- once in forward, once in backward -- with
``bitsandbytes.functional.dequantize_4bit`` (bnb's own fast CUDA path; bnb's MatMul4Bit does the same per
projection), and only the packed 4-bit tensor is kept for backward, so the fused LoRA math above runs on
QLoRA layers too and no bf16 copy of a weight outlives its matmul.
"""

from __future__ import annotations

import torch

from .glu import glu_backward, glu_forward


def is_quantized(w) -> bool:
    """A bitsandbytes 4-bit weight (packed codes + quant_state) rather than a dense matrix."""
    return getattr(w, "quant_state", None) is not None


def dense(w, dtype):
    """W as a dense (out x in) matrix of ``dtype``: dequantised when NF4/FP4, else W itself."""
    if not is_quantized(w):
        return w
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(w.data, w.quant_state).to(dtype)


def _lin(x, w, a, b, s):
    """x W^T + s (x A^T) B^T; returns (out, x A^T or None)."""
    out = x @ dense(w, x.dtype).t()
    if a is None:
        return out, None
    xa = x @ a.t()
    return out.addmm_(xa, b.t(), alpha=s), xa


def _lin_backward(dout, x, xa, w, a, b, s, needs):
    """(dx, dW, dA, dB) of _lin given dout; dW only when W needs it."""
    dx = dout @ dense(w, dout.dtype)
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


class LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, ag, bg, wu, au, bu, wd, ad, bd, sg, su, sd, gelu):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        g, xag = _lin(x2, wg, ag, bg, sg)
        u, xau = _lin(x2, wu, au, bu, su)
        h = glu_forward(g, u, gelu)
        y, had = _lin(h, wd, ad, bd, sd)
        # 4-bit weights are frozen parameters: kept by reference on ctx (save_for_backward would drop the
        # quant_state attribute they need to be dequantised); dense ones go through save_for_backward.
        ctx.quantized = [w if is_quantized(w) else None for w in (wg, wu, wd)]
        wg, wu, wd = (None if is_quantized(w) else w for w in (wg, wu, wd))
        ctx.save_for_backward(x2, g, u, xag, xau, had, wg, ag, bg, wu, au, bu, wd, ad, bd)
        ctx.scales, ctx.gelu, ctx.shape = (sg, su, sd), gelu, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, g, u, xag, xau, had, wg, ag, bg, wu, au, bu, wd, ad, bd = ctx.saved_tensors
        qg, qu, qd = ctx.quantized
        wg, wu, wd = (q if q is not None else w for q, w in ((qg, wg), (qu, wu), (qd, wd)))
        sg, su, sd = ctx.scales
        n = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        # down projection: dh, and the down adapter's grads need h, recomputed with dg, du below
        dh = dy2 @ dense(wd, dy2.dtype)
        dyb = None
        if ad is not None:
            dyb = dy2 @ bd
            dh.addmm_(dyb, ad, alpha=sd)
        h, dg, du = glu_backward(dh, g, u, ctx.gelu)
        del dh
        dwd = dy2.t() @ h if n[7] else None
        dad = (dyb.t() @ h).mul_(sd) if (ad is not None and n[8]) else None
        dbd = (dy2.t() @ had).mul_(sd) if (ad is not None and n[9]) else None
        del h
        dx, dwg, dag, dbg = _lin_backward(dg, x2, xag, wg, ag, bg, sg, n[1:4])
        dxu, dwu, dau, dbu = _lin_backward(du, x2, xau, wu, au, bu, su, n[4:7])
        dx += dxu
        return (dx.view(ctx.shape), dwg, dag, dbg, dwu, dau, dbu, dwd, dad, dbd, None, None, None, None)


def lora_mlp(x, gate, up, down, gelu: bool = False):
    """Fused gated MLP. ``gate``/``up``/``down``: (W, A, B, scale) with A = B = None where no adapter."""
    return LoRAMLP.apply(x, *gate[:3], *up[:3], *down[:3], float(gate[3]), float(up[3]), float(down[3]), bool(gelu))


def lora_mlp_reference(x, gate, up, down, gelu: bool = False):
    """Plain autograd over the same algebra (what peft computes with dropout 0)."""
    def lin(t, p):
        w, a, b, s = p
        out = t @ dense(w, t.dtype).t()
        return out if a is None else out + s * ((t @ a.t()) @ b.t())

    g, u = lin(x, gate), lin(x, up)
    act = torch.nn.functional.gelu(g, approximate="tanh") if gelu else torch.nn.functional.silu(g)
    return lin(act * u, down)
