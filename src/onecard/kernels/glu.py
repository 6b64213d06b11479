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
