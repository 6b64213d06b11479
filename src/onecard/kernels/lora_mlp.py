"""The gated MLP with LoRA on gate/up/down as one autograd.Function (Unsloth's LoRA_MLP idea).

Per projection p with frozen W_p (out x in), adapter A_p (r x in), B_p (out x r), scale s_p:
    lin_p(x) = x W_p^T + s_p (x A_p^T) B_p^T
    g = lin_g(x),  u = lin_u(x),  h = act(g) * u,  y = lin_d(h)
Saved for backward: x, g, u and the rank-r product x [A_g; A_u]^T (tiny; W, A and B are kept on ctx,
kernels/lora_linear.py ``keep_for_backward``). h is *recomputed* in backward by
the fused GLU kernel together with dg, du (and h A_d^T from it), so the intermediate-sized act(g) and h are not
kept (transformers + peft keep g, u, act(g), act(g)*u and the dropout inputs: ~2 more tensors), and a
checkpoint's recompute (``skip_output``) stops after g and u: no GLU, no down projection.

Backward, upstream dy (N x H), with P = h A_d^T (N x r):
    dB_d = s_d dy^T P                 dA_d = s_d (dy B_d)^T h
    dh   = dy W_d + s_d (dy B_d) A_d
    (h, dg, du) = glu_backward(dh, g, u)            [dg = dh u act'(g),  du = dh act(g)]
    dB_g = s_g dg^T (x A_g^T)          dA_g = s_g (dg B_g)^T x          (same for up)
    dx   = dg W_g + s_g (dg B_g) A_g + du W_u + s_u (du B_u) A_u
Frozen W get no gradient and none of the (out x in) weight-gradient matmuls run: that is the saving
over autograd, which still builds the graph through the base layers. A projection without an
adapter passes A = B = None. LoRA dropout is not modelled: callers use this only when it is 0.

DoRA: a projection may carry a magnitude m (kernels/lora_linear.py, :func:`dora_lin`): it runs as LoRA on the
row-scaled (W_s, B_s), so g and u are the true outputs and are saved as for LoRA; backward takes dm_g from
sum dg g / m_g (and the same for u), which needs g and u after the GLU backward, so that backward is not in
place for a DoRA gate or up. A DoRA down projection needs its output y_d for dm: it is kept on ctx (not among
the saved tensors), so ``skip_output`` skips its GEMM in a checkpoint's recompute as for LoRA (the recompute's
saved tensors stay the same as the first forward's, as torch's checkpoint requires), and y_d (tokens x hidden)
waits on the GPU until backward -- 4 GiB on Llama 3 8B at 16k tokens, for one GEMM per layer less.

QLoRA: a frozen W may be a bitsandbytes NF4 ``Params4bit`` (it carries ``quant_state``). It is dequantised
to the compute dtype right before each use -- once in forward, once in backward -- with
``bitsandbytes.functional.dequantize_4bit`` (bnb's own fast CUDA path; bnb's MatMul4Bit does the same per
projection), and only the packed 4-bit tensor is kept for backward, so the fused LoRA math above runs on
QLoRA layers too and no bf16 copy of a weight outlives its matmul.

FP8 base (kernels/fp8.py): for an e4m3 W_d the GLU kernel writes h's row-wise e4m3 copy beside h (one pass), and in
backward, for e4m3 W_g and W_u, the GLU backward kernel writes rowquant(dg diag(s_g)) and rowquant(du diag(s_u))
beside dg and du, so the FP8 input-gradient GEMMs dg W_g + du W_u read no separate quantisation pass; dy for
dy W_d is quantised by one Triton pass. x's copy comes from the FP8 RMSNorm (``x_fp8``) or is made here.
The frozen FP8 GEMMs add onto the rank-r parts in their epilogue, as the bf16 ones do (kernels/cublaslt.py).
"""

from __future__ import annotations

import torch

from .fp8 import fp8_input_grad, is_fp8
from .glu import glu_backward, glu_backward_fp8, glu_forward, glu_forward_fp8
from .lora_linear import (dense, dora_lin, dora_magnitude_grad, dora_norm, dora_ratio, dora_weights, is_quantized,
                          keep_for_backward, lin, out_features, rank_product_blocks, scaled_in_place,
                          shared_input_backward, shared_input_forward, unpack_parts)

__all__ = ["lora_mlp", "lora_mlp_reference", "dense", "is_quantized"]


class LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, ag, bg, mg, wu, au, bu, mu, wd, ad, bd, md, sg, su, sd, gelu, skip_output, x_fp8):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        (g, u), xa, (ng, nu) = shared_input_forward(x2, [(wg, None, ag, bg, mg), (wu, None, au, bu, mu)], (sg, su),
                                                    x_fp8)
        nd = None
        if skip_output:  # a checkpoint's recompute: nothing reads y, nor h (see lora_mlp)
            y = x2.new_empty(x2.shape[0], out_features(wd))
            if md is not None:  # saved in the first forward too: the saved tensors must match
                nd = dora_norm(dense(wd, x2.dtype), ad, bd, sd, key=wd)
        else:
            h_fp8 = None
            if is_fp8(wd) and md is None:
                h, h_fp8 = glu_forward_fp8(g, u, gelu)
            else:
                h = glu_forward(g, u, gelu)
            if md is None:
                y, _ = lin(h, wd, ad, bd, sd, x_fp8=h_fp8)
            else:
                y, _, nd = dora_lin(h, wd, ad, bd, sd, md)
                # DoRA's dm_d needs y_d. Kept on ctx, not saved: a checkpoint keeps ctx attributes of the first
                # forward (its recompute only refills saved tensors), so the recompute can skip this GEMM as for
                # LoRA -- at the cost of y_d (tokens x hidden) staying on the GPU until backward.
                ctx.dora_down_output = y
            del h
        keep_for_backward(ctx, (wg, wu, wd), (ag, bg, au, bu, ad, bd))
        ctx.save_for_backward(x2, g, u, xa, mg, ng, mu, nu, md, nd)
        ctx.scales, ctx.gelu, ctx.shape = (sg, su, sd), gelu, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, g, u, xa, mg, ng, mu, nu, md, nd = ctx.saved_tensors
        (wg, wu, wd), (ag, bg, au, bu, ad, bd) = ctx.weights, ctx.adapters
        xag, xau = rank_product_blocks(xa, (ag, au))
        sg, su, sd = ctx.scales
        n = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        dmd = None
        # down projection: dh (rank-r part first, kernels/lora_linear.py lora_first) and its adapter's A-side; its
        # grads need h, recomputed below
        if md is None:
            wd_dense, bd_used = (wd if is_fp8(wd) else dense(wd, dy2.dtype)), bd
        else:  # DoRA: LoRA's backward on the row-scaled weights; y_d from forward (ctx, see forward)
            wd_dense, bd_used = _dora_down(wd, ad, bd, sd, md, nd, dy2.dtype)
            if ctx.dora_down_output is None:
                raise RuntimeError("a DoRA MLP's backward ran twice (retain_graph): its kept output is freed by the "
                                   "first backward; onecard's fused DoRA path does not support that")
            dmd = dora_magnitude_grad(dy2, ctx.dora_down_output, md, nd) if n[12] else None
            ctx.dora_down_output = None  # freed now: ctx outlives backward while the caller holds the loss
        dybs = None if ad is None else scaled_in_place(dy2 @ bd_used, sd)  # s_d dy B_d, for dh and dA_d
        if is_fp8(wd_dense):  # the FP8 GEMM adds onto the rank-r part in its epilogue (kernels/cublaslt.py)
            dh = fp8_input_grad(dy2, wd_dense, out=None if dybs is None else dybs @ ad)
        elif ad is None:
            dh = dy2 @ wd_dense
        else:
            dh = dybs @ ad
            dh.addmm_(dy2, wd_dense)
        del wd_dense
        # in place (LoRA): dh, and g/u (saved for this backward alone) are overwritten; DoRA's dm needs g and u after
        inplace, dy_fp8 = mg is None and mu is None, None
        if inplace and is_fp8(wg) and is_fp8(wu):
            h, dg, du, *dy_fp8 = glu_backward_fp8(dh, g, u, wg.scale, wu.scale, ctx.gelu, inplace=True)
        else:
            h, dg, du = glu_backward(dh, g, u, ctx.gelu, inplace=inplace)
        del dh
        dwd = dy2.t() @ h if n[9] else None
        dad = dybs.t() @ h if (ad is not None and n[10]) else None
        dbd = scaled_in_place(dy2.t() @ (h @ ad.t()), sd) if (ad is not None and n[11]) else None  # h A_d^T: rebuilt
        if dbd is not None and md is not None:
            dbd.mul_(dora_ratio(md, nd))
        if dwd is not None and md is not None:
            dwd.mul_(dora_ratio(md, nd))
        del h
        dx, ((dwg, dag, dbg, dmg), (dwu, dau, dbu, dmu)) = shared_input_backward(
            [dg, du], x2, [xag, xau], [g, u], [ng, nu], [(wg, None, ag, bg, mg), (wu, None, au, bu, mu)], (sg, su),
            [n[1:5], n[5:9]], dy_fp8)
        return (dx.view(ctx.shape), dwg, dag, dbg, dmg, dwu, dau, dbu, dmu, dwd, dad, dbd, dmd,
                None, None, None, None, None, None)


def _dora_down(wd, ad, bd, sd, md, nd, dtype):
    """The down projection's row-scaled (W_s, B_s) (:func:`dora_weights`, the norm from forward)."""
    ws, bs, _ = dora_weights(wd, ad, bd, sd, md, dtype, nd)
    return ws, bs


def lora_mlp(x, gate, up, down, gelu: bool = False, skip_output: bool = False, x_fp8=None):
    """Fused gated MLP. ``gate``/``up``/``down``: (W, A, B, scale[, bias (must be None)[, magnitude]]) with
    A = B = None where no adapter and magnitude None unless DoRA.

    ``skip_output``: return an uninitialised tensor instead of y and skip the GLU and the down projection. Only
    for the recompute of a checkpointed layer whose MLP output goes straight into the residual add (Llama,
    Mistral, Qwen2, Gemma): there nothing reads y -- torch's non-reentrant checkpoint stops recomputing once the
    last saved tensor (this op's) is packed -- and backward rebuilds h from g and u anyway. It saves the largest
    recomputed GEMM, a quarter of the layer's recompute FLOPs on Llama 3 8B (patch/recompute.py). A DoRA down
    projection still runs (its pre-scale output is saved for the magnitude's gradient).

    ``x_fp8``: x's row-wise e4m3 copy from its producer (the FP8 RMSNorm), for FP8 gate/up weights.
    """
    (wg, ag, bg, sg, cg, mg), (wu, au, bu, su, cu, mu), (wd, ad, bd, sd, cd, md) = map(unpack_parts, (gate, up, down))
    assert cg is None and cu is None and cd is None, "the fused MLP takes no biases"
    return LoRAMLP.apply(x, wg, ag, bg, mg, wu, au, bu, mu, wd, ad, bd, md, float(sg), float(su), float(sd),
                         bool(gelu), bool(skip_output), x_fp8)


def lora_mlp_reference(x, gate, up, down, gelu: bool = False):
    """Plain autograd over the same algebra (what peft computes with dropout 0), DoRA as peft writes it."""
    from .lora_linear import lora_projections_reference

    def lin(t, p):
        return lora_projections_reference(t, [p])[0]

    g, u = lin(x, gate), lin(x, up)
    act = torch.nn.functional.gelu(g, approximate="tanh") if gelu else torch.nn.functional.silu(g)
    return lin(act * u, down)
