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

DoRA: a projection may carry a magnitude m (kernels/lora_linear.py, :func:`dora_lin`). For gate and up the
slot of g (u) then holds the pre-scale z_g (z_u) -- same size -- and backward rebuilds g = (m/n) z_g elementwise
before the GLU backward; dm and dz follow :func:`dora_backward`. A DoRA down projection needs z_d for dm, so it
is saved, and ``skip_output`` does not skip its GEMM (skipping would only move that GEMM into backward); the
saved tensors are the same in both modes, as torch's checkpoint requires.

QLoRA: a frozen W may be a bitsandbytes NF4 ``Params4bit`` (it carries ``quant_state``). It is dequantised
to the compute dtype right before each use -- once in forward, once in backward -- with
``bitsandbytes.functional.dequantize_4bit`` (bnb's own fast CUDA path; bnb's MatMul4Bit does the same per
projection), and only the packed 4-bit tensor is kept for backward, so the fused LoRA math above runs on
QLoRA layers too and no bf16 copy of a weight outlives its matmul.
"""

from __future__ import annotations

import torch

from .glu import glu_backward, glu_forward
from .lora_linear import (dense, dora_backward, dora_lin, dora_scale_minus_one, is_quantized, keep_for_backward, lin,
                          lin_backward, restore_weights, unpack_parts)

__all__ = ["lora_mlp", "lora_mlp_reference", "dense", "is_quantized"]


def _project(x, w, a, b, s, m):
    """(out, x A^T, the tensor to save for out, n): plain LoRA saves out itself, DoRA its pre-scale z."""
    if m is None:
        out, xa = lin(x, w, a, b, s)
        return out, xa, out, None
    return dora_lin(x, w, a, b, s, m)


def _rescaled(saved, m, n):
    """The projection's output from what :func:`_project` saved."""
    return saved if m is None else torch.addcmul(saved, saved, dora_scale_minus_one(m, n, saved.dtype))


class LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, ag, bg, mg, wu, au, bu, mu, wd, ad, bd, md, sg, su, sd, gelu, skip_output):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        g, xag, g_saved, ng = _project(x2, wg, ag, bg, sg, mg)
        u, xau, u_saved, nu = _project(x2, wu, au, bu, su, mu)
        h = glu_forward(g, u, gelu)
        del g, u
        zd = nd = None
        if skip_output and md is None:  # a checkpoint's recompute: nothing reads y (see lora_mlp)
            had = None if ad is None else h @ ad.t()
            y = x2.new_empty(x2.shape[0], _out_features(wd))
        elif md is None:
            y, had = lin(h, wd, ad, bd, sd)
        else:
            y, had, zd, nd = dora_lin(h, wd, ad, bd, sd, md)
        del h
        wg, wu, wd = keep_for_backward(ctx, (wg, wu, wd))
        ctx.save_for_backward(x2, g_saved, u_saved, xag, xau, had, zd, wg, ag, bg, mg, ng, wu, au, bu, mu, nu,
                              wd, ad, bd, md, nd)
        ctx.scales, ctx.gelu, ctx.shape = (sg, su, sd), gelu, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, g_saved, u_saved, xag, xau, had, zd, wg, ag, bg, mg, ng, wu, au, bu, mu, nu, wd, ad, bd, md, nd = \
            ctx.saved_tensors
        wg, wu, wd = restore_weights(ctx, (wg, wu, wd))
        sg, su, sd = ctx.scales
        n = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        dmd = None
        if md is not None:
            dy2, dmd = dora_backward(dy2, zd, md, nd, n[12])
        # down projection: dh, and the down adapter's grads need h, recomputed with dg, du below
        dh = dy2 @ dense(wd, dy2.dtype)
        dyb = None
        if ad is not None:
            dyb = dy2 @ bd
            dh.addmm_(dyb, ad, alpha=sd)
        # in place: dh, and g/u (saved for this backward alone; DoRA rebuilds them as new tensors) are overwritten
        h, dg, du = glu_backward(dh, _rescaled(g_saved, mg, ng), _rescaled(u_saved, mu, nu), ctx.gelu, inplace=True)
        del dh
        dwd = dy2.t() @ h if n[9] else None
        dad = (dyb.t() @ h).mul_(sd) if (ad is not None and n[10]) else None
        dbd = (dy2.t() @ had).mul_(sd) if (ad is not None and n[11]) else None
        del h
        dmg = dmu = None
        if mg is not None:
            dg, dmg = dora_backward(dg, g_saved, mg, ng, n[4])
        if mu is not None:
            du, dmu = dora_backward(du, u_saved, mu, nu, n[8])
        dx, dwg, dag, dbg = lin_backward(dg, x2, xag, wg, ag, bg, sg, n[1:4])
        dx, dwu, dau, dbu = lin_backward(du, x2, xau, wu, au, bu, su, n[5:8], dx)
        return (dx.view(ctx.shape), dwg, dag, dbg, dmg, dwu, dau, dbu, dmu, dwd, dad, dbd, dmd,
                None, None, None, None, None)


def _out_features(w) -> int:
    return int(w.quant_state.shape[0]) if is_quantized(w) else int(w.shape[0])


def lora_mlp(x, gate, up, down, gelu: bool = False, skip_output: bool = False):
    """Fused gated MLP. ``gate``/``up``/``down``: (W, A, B, scale[, bias (must be None)[, magnitude]]) with
    A = B = None where no adapter and magnitude None unless DoRA.

    ``skip_output``: return an uninitialised tensor instead of y and skip the down projection's GEMM. Only
    for the recompute of a checkpointed layer whose MLP output goes straight into the residual add (Llama,
    Mistral, Qwen2, Gemma): there nothing reads y -- torch's non-reentrant checkpoint stops recomputing once the
    last saved tensor (this op's) is packed -- and backward rebuilds h from g and u anyway. It saves the largest
    recomputed GEMM, a quarter of the layer's recompute FLOPs on Llama 3 8B (patch/recompute.py). A DoRA down
    projection still runs (its pre-scale output is saved for the magnitude's gradient).
    """
    (wg, ag, bg, sg, cg, mg), (wu, au, bu, su, cu, mu), (wd, ad, bd, sd, cd, md) = map(unpack_parts, (gate, up, down))
    assert cg is None and cu is None and cd is None, "the fused MLP takes no biases"
    return LoRAMLP.apply(x, wg, ag, bg, mg, wu, au, bu, mu, wd, ad, bd, md, float(sg), float(su), float(sd),
                         bool(gelu), bool(skip_output))


def lora_mlp_reference(x, gate, up, down, gelu: bool = False):
    """Plain autograd over the same algebra (what peft computes with dropout 0), DoRA as peft writes it."""
    from .lora_linear import lora_projections_reference

    def lin(t, p):
        return lora_projections_reference(t, [p])[0]

    g, u = lin(x, gate), lin(x, up)
    act = torch.nn.functional.gelu(g, approximate="tanh") if gelu else torch.nn.functional.silu(g)
    return lin(act * u, down)
