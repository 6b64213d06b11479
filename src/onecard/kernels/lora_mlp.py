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
from .lora_linear import dense, is_quantized, keep_for_backward, lin, lin_backward, restore_weights

__all__ = ["lora_mlp", "lora_mlp_reference", "dense", "is_quantized"]


class LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, ag, bg, wu, au, bu, wd, ad, bd, sg, su, sd, gelu, skip_output):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        g, xag = lin(x2, wg, ag, bg, sg)
        u, xau = lin(x2, wu, au, bu, su)
        h = glu_forward(g, u, gelu)
        if skip_output:  # a checkpoint's recompute: nothing reads y (see lora_mlp); the saved tensors stay the same
            had = None if ad is None else h @ ad.t()
            y = x2.new_empty(x2.shape[0], _out_features(wd))
        else:
            y, had = lin(h, wd, ad, bd, sd)
        del h
        wg, wu, wd = keep_for_backward(ctx, (wg, wu, wd))
        ctx.save_for_backward(x2, g, u, xag, xau, had, wg, ag, bg, wu, au, bu, wd, ad, bd)
        ctx.scales, ctx.gelu, ctx.shape = (sg, su, sd), gelu, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, g, u, xag, xau, had, wg, ag, bg, wu, au, bu, wd, ad, bd = ctx.saved_tensors
        wg, wu, wd = restore_weights(ctx, (wg, wu, wd))
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
        dx, dwg, dag, dbg = lin_backward(dg, x2, xag, wg, ag, bg, sg, n[1:4])
        dx, dwu, dau, dbu = lin_backward(du, x2, xau, wu, au, bu, su, n[4:7], dx)
        return (dx.view(ctx.shape), dwg, dag, dbg, dwu, dau, dbu, dwd, dad, dbd, None, None, None, None, None)


def _out_features(w) -> int:
    return int(w.quant_state.shape[0]) if is_quantized(w) else int(w.shape[0])


def lora_mlp(x, gate, up, down, gelu: bool = False, skip_output: bool = False):
    """Fused gated MLP. ``gate``/``up``/``down``: (W, A, B, scale) with A = B = None where no adapter.

    ``skip_output``: return an uninitialised tensor instead of y and skip the down projection's GEMM. Only
    for the recompute of a checkpointed layer whose MLP output goes straight into the residual add (Llama,
    Mistral, Qwen2, Gemma): there nothing reads y -- torch's non-reentrant checkpoint stops recomputing once the
    last saved tensor (this op's) is packed -- and backward rebuilds h from g and u anyway. It saves the largest
    recomputed GEMM, a quarter of the layer's recompute FLOPs on Llama 3 8B (patch/recompute.py).
    """
    return LoRAMLP.apply(x, *gate[:3], *up[:3], *down[:3], float(gate[3]), float(up[3]), float(down[3]), bool(gelu),
                         bool(skip_output))


def lora_mlp_reference(x, gate, up, down, gelu: bool = False):
    """Plain autograd over the same algebra (what peft computes with dropout 0)."""
    def lin(t, p):
        w, a, b, s = p
        out = t @ dense(w, t.dtype).t()
        return out if a is None else out + s * ((t @ a.t()) @ b.t())

    g, u = lin(x, gate), lin(x, up)
    act = torch.nn.functional.gelu(g, approximate="tanh") if gelu else torch.nn.functional.silu(g)
    return lin(act * u, down)
