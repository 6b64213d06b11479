"""Gated MLP activations: SwiGLU (Llama, Mistral, Qwen2) and GeGLU-tanh (Gemma), Triton + reference.

h = act(g) * u, with g = gate_proj(x), u = up_proj(x). Forward and backward are single
elementwise passes computed in fp32; the backward *recomputes* act(g) from the saved g, so nothing
besides g and u is kept (transformers keeps act(g) too: one intermediate-sized tensor per layer).

Derivatives (s = sigmoid(g); for GeGLU k = sqrt(2/pi), c = 0.044715, t = tanh(k (g + c g^3))):
    silu(g)  = g s                         silu'(g) = s (1 + g (1 - s))
    gelu(g)  = g (1 + t) / 2               gelu'(g) = (1 + t) / 2 + g (1 - t^2) k (1 + 3 c g^2) / 2
    dg = dh * u * act'(g)       du = dh * act(g)
The backward kernel also writes h = act(g) u, which the LoRA MLP's down-projection backward needs
(Unsloth's LoRA_MLP trick: recompute h instead of storing it).
"""

from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON, use_triton

_BLOCK = 1024
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _act_and_grad(g, GELU: tl.constexpr):
        if GELU:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh, via sigmoid (portable across Triton versions)
            a = 0.5 * g * (1.0 + t)
            da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        else:
            s = tl.sigmoid(g)
            a = g * s
            da = s * (1.0 + g * (1.0 - s))
        return a, da

    @triton.jit
    def _glu_fwd(G, U, H, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(g, GELU)
        tl.store(H + offs, (a * u).to(H.dtype.element_ty), mask=m)

    @triton.jit
    def _glu_bwd(DH, G, U, H, DG, DU, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        dh = tl.load(DH + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
        a, da = _act_and_grad(g, GELU)
        tl.store(H + offs, (a * u).to(H.dtype.element_ty), mask=m)
        tl.store(DG + offs, (dh * u * da).to(DG.dtype.element_ty), mask=m)
        tl.store(DU + offs, (dh * a).to(DU.dtype.element_ty), mask=m)


    from .fp8 import e4m3_code, e4m3_scale

    @triton.jit
    def _glu_fwd_fp8(G, U, H, Q, S, n_cols, GELU: tl.constexpr, CHUNK: tl.constexpr):
        """Row r of h = act(g) u, and its row-wise e4m3 copy: pass 1 writes h and takes the row's amax, pass 2
        recomputes h from g, u (no read-after-write across threads) and writes q = h / scale."""
        base = tl.program_id(0).to(tl.int64) * n_cols
        amax = tl.zeros((CHUNK,), dtype=tl.float32)
        for c0 in range(0, n_cols, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            m = cols < n_cols
            a, _ = _act_and_grad(tl.load(G + base + cols, mask=m, other=0.0).to(tl.float32), GELU)
            h = (a * tl.load(U + base + cols, mask=m, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + base + cols, h, mask=m)
            amax = tl.maximum(amax, tl.abs(h.to(tl.float32)))
        scale = e4m3_scale(tl.max(amax, axis=0))
        for c0 in range(0, n_cols, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            m = cols < n_cols
            a, _ = _act_and_grad(tl.load(G + base + cols, mask=m, other=0.0).to(tl.float32), GELU)
            h = (a * tl.load(U + base + cols, mask=m, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            q = e4m3_code(h.to(tl.float32), scale)
            tl.store(Q + base + cols, q.to(Q.dtype.element_ty), mask=m)
        tl.store(S + tl.program_id(0), scale)

    @triton.jit
    def _glu_bwd_fp8(DH, G, U, H, DG, DU, CG, CU, QG, SG, QU, SU, n_cols, GELU: tl.constexpr, CHUNK: tl.constexpr):
        """Row r of :func:`_glu_bwd`, plus row-wise e4m3 copies of dg * cg and du * cu (cg, cu: the gate's and up's
        per-output-channel weight scales, folded in for the FP8 input-gradient GEMM, kernels/fp8.py). Pass 2 reads
        back this program's own dg, du after a barrier (they may overwrite g, u: in place)."""
        base = tl.program_id(0).to(tl.int64) * n_cols
        amax_g = tl.zeros((CHUNK,), dtype=tl.float32)
        amax_u = tl.zeros((CHUNK,), dtype=tl.float32)
        for c0 in range(0, n_cols, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            m = cols < n_cols
            dh = tl.load(DH + base + cols, mask=m, other=0.0).to(tl.float32)
            g = tl.load(G + base + cols, mask=m, other=0.0).to(tl.float32)
            u = tl.load(U + base + cols, mask=m, other=0.0).to(tl.float32)
            a, da = _act_and_grad(g, GELU)
            dg = (dh * u * da).to(DG.dtype.element_ty)
            du = (dh * a).to(DU.dtype.element_ty)
            tl.store(H + base + cols, (a * u).to(H.dtype.element_ty), mask=m)
            tl.store(DG + base + cols, dg, mask=m)
            tl.store(DU + base + cols, du, mask=m)
            amax_g = tl.maximum(amax_g, tl.abs(dg.to(tl.float32) * tl.load(CG + cols, mask=m, other=0.0)))
            amax_u = tl.maximum(amax_u, tl.abs(du.to(tl.float32) * tl.load(CU + cols, mask=m, other=0.0)))
        scale_g = e4m3_scale(tl.max(amax_g, axis=0))
        scale_u = e4m3_scale(tl.max(amax_u, axis=0))
        tl.debug_barrier()
        for c0 in range(0, n_cols, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            m = cols < n_cols
            dg = tl.load(DG + base + cols, mask=m, other=0.0).to(tl.float32) * tl.load(CG + cols, mask=m, other=0.0)
            du = tl.load(DU + base + cols, mask=m, other=0.0).to(tl.float32) * tl.load(CU + cols, mask=m, other=0.0)
            tl.store(QG + base + cols, e4m3_code(dg, scale_g).to(QG.dtype.element_ty), mask=m)
            tl.store(QU + base + cols, e4m3_code(du, scale_u).to(QU.dtype.element_ty), mask=m)
        tl.store(SG + tl.program_id(0), scale_g)
        tl.store(SU + tl.program_id(0), scale_u)


def _act_reference(g: torch.Tensor, gelu: bool):
    """(act(g), act'(g)) in g's dtype's fp32 upcast; the formulas of this module's docstring."""
    gf = g.float() if g.dtype != torch.float64 else g
    if gelu:
        t = torch.tanh(_SQRT_2_OVER_PI * (gf + 0.044715 * gf**3))
        a = 0.5 * gf * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * gf * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * gf * gf)
    else:
        s = torch.sigmoid(gf)
        a, da = gf * s, s * (1.0 + gf * (1.0 - s))
    return a, da


def glu_forward(g: torch.Tensor, u: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """h = act(g) * u without autograd (building block of the fused MLPs)."""
    if use_triton(g, u) and g.dtype != torch.float64:
        g, u = g.contiguous(), u.contiguous()
        h = torch.empty_like(g)
        _glu_fwd[(triton.cdiv(g.numel(), _BLOCK),)](g, u, h, g.numel(), GELU=gelu, BLOCK=_BLOCK)
        return h
    a, _ = _act_reference(g, gelu)
    return (a * u.to(a.dtype)).to(g.dtype)


def glu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, gelu: bool = False, inplace: bool = False):
    """(h, dg, du) from the upstream dh and the saved g, u: one pass, act(g) recomputed.

    ``inplace``: write h over dh, dg over g and du over u (each element is read before it is written, and
    no two programs share an element), for callers that need none of the three afterwards: the fused
    MLP's backward then holds 3 intermediate-sized tensors instead of 6 (Llama 3 8B, 16k tokens: 1.4 GB less
    at the step's peak). The CPU reference path ignores it.
    """
    if use_triton(dh, g, u) and g.dtype != torch.float64:
        dh, g, u = dh.contiguous(), g.contiguous(), u.contiguous()
        if inplace:
            h, dg, du = dh, g, u
        else:
            h, dg, du = torch.empty_like(g), torch.empty_like(g), torch.empty_like(u)
        _glu_bwd[(triton.cdiv(g.numel(), _BLOCK),)](dh, g, u, h, dg, du, g.numel(), GELU=gelu, BLOCK=_BLOCK)
        return h, dg, du
    a, da = _act_reference(g, gelu)
    uf, dhf = u.to(a.dtype), dh.to(a.dtype)
    return (a * uf).to(g.dtype), (dhf * uf * da).to(g.dtype), (dhf * a).to(u.dtype)


class GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, gelu):
        ctx.save_for_backward(g, u)
        ctx.gelu = gelu
        return glu_forward(g, u, gelu)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        _, dg, du = glu_backward(dh, g, u, ctx.gelu)
        return dg, du, None


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u, differentiable."""
    return GLU.apply(g, u, False)


def geglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(g) * u (Gemma's ``gelu_pytorch_tanh``), differentiable."""
    return GLU.apply(g, u, True)


def glu_reference(g: torch.Tensor, u: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """transformers' path: ACT2FN[...](gate) * up, in the input dtype."""
    act = torch.nn.functional.gelu(g, approximate="tanh") if gelu else torch.nn.functional.silu(g)
    return act * u


_FP8_CHUNK = 1024


def glu_forward_fp8(g: torch.Tensor, u: torch.Tensor, gelu: bool = False):
    """(h, (q, scale)): h = act(g) u for 2-D g, u, and h's row-wise e4m3 copy (kernels/fp8.py), from one kernel."""
    from .fp8 import quantize_rows_reference

    if use_triton(g, u) and g.dtype != torch.float64:
        g, u = g.contiguous(), u.contiguous()
        h = torch.empty_like(g)
        q = torch.empty(g.shape, dtype=torch.float8_e4m3fn, device=g.device)
        scale = torch.empty((g.shape[0], 1), dtype=torch.float32, device=g.device)
        _glu_fwd_fp8[(g.shape[0],)](g, u, h, q, scale, g.shape[1], GELU=gelu, CHUNK=_FP8_CHUNK, num_warps=4)
        return h, (q, scale)
    h = glu_forward(g, u, gelu)
    return h, quantize_rows_reference(h)


def glu_backward_fp8(dh, g, u, col_scale_g, col_scale_u, gelu: bool = False, inplace: bool = False):
    """:func:`glu_backward` for 2-D tensors, plus the row-wise e4m3 copies of dg * col_scale_g and du * col_scale_u
    (each (q, scale)): (h, dg, du, dg_fp8, du_fp8). ``inplace`` as in :func:`glu_backward`."""
    from .fp8 import quantize_rows_reference

    if use_triton(dh, g, u) and g.dtype != torch.float64:
        dh, g, u = dh.contiguous(), g.contiguous(), u.contiguous()
        h, dg, du = (dh, g, u) if inplace else (torch.empty_like(g), torch.empty_like(g), torch.empty_like(u))
        n, cols = g.shape
        qg, qu = (torch.empty(g.shape, dtype=torch.float8_e4m3fn, device=g.device) for _ in range(2))
        sg, su = (torch.empty((n, 1), dtype=torch.float32, device=g.device) for _ in range(2))
        _glu_bwd_fp8[(n,)](dh, g, u, h, dg, du, col_scale_g, col_scale_u, qg, sg, qu, su, cols, GELU=gelu,
                           CHUNK=_FP8_CHUNK, num_warps=4)
        return h, dg, du, (qg, sg), (qu, su)
    h, dg, du = glu_backward(dh, g, u, gelu)
    return h, dg, du, quantize_rows_reference(dg, col_scale_g), quantize_rows_reference(du, col_scale_u)
