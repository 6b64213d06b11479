"""Rotary position embedding on q and k in one Triton pass, transformers' rotate_half convention.

transformers 5.17 (modeling_llama.apply_rotary_pos_emb): out = x * cos + rotate_half(x) * sin,
rotate_half(x) = cat(-x2, x1) for halves x1, x2 of the head dim. Per half:
    o1 = x1 c1 - x2 s1          o2 = x2 c2 + x1 s2
The map is linear in x, x -> C x + S R x with R = rotate_half; its adjoint is
C + R^T S and R^T (v1, v2) = (v2, -v1), so the backward is the same kernel with
    d1 = g1 c1 + g2 s2          d2 = g2 c2 - g1 s1
cos/sin carry no gradient (they come from positions under no_grad in transformers).
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_power_of_2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_kernel(
        X, OUT, COS, SIN, seq_len, n_heads, half,
        sxb, sxh, sxs, sob, soh, sos, scb, scs,
        BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // seq_len
        s = pid % seq_len
        d = tl.arange(0, BLOCK_D)
        h = tl.arange(0, BLOCK_H)
        dm = d < half
        base_c = b * scb + s * scs
        c1 = tl.load(COS + base_c + d, mask=dm, other=0.0).to(tl.float32)
        c2 = tl.load(COS + base_c + half + d, mask=dm, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + base_c + d, mask=dm, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + base_c + half + d, mask=dm, other=0.0).to(tl.float32)
        m = (h[:, None] < n_heads) & dm[None, :]
        xp = X + b * sxb + h[:, None] * sxh + s * sxs + d[None, :]
        x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xp + half, mask=m, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1[None, :] + x2 * s2[None, :]
            o2 = x2 * c2[None, :] - x1 * s1[None, :]
        else:
            o1 = x1 * c1[None, :] - x2 * s1[None, :]
            o2 = x2 * c2[None, :] + x1 * s2[None, :]
        op = OUT + b * sob + h[:, None] * soh + s * sos + d[None, :]
        tl.store(op, o1.to(OUT.dtype.element_ty), mask=m)
        tl.store(op + half, o2.to(OUT.dtype.element_ty), mask=m)


def _rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x: (B, H, S, D) any strides with unit last stride; cos/sin: (B or 1, S, D)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    bsz, n_heads, seq_len, dim = x.shape
    cos = cos.expand(bsz, seq_len, dim)
    sin = sin.expand(bsz, seq_len, dim)
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    half = dim // 2
    _rope_kernel[(bsz * seq_len,)](
        x, out, cos, sin, seq_len, n_heads, half,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        cos.stride(0), cos.stride(1),
        BACKWARD=backward, BLOCK_H=next_power_of_2(n_heads), BLOCK_D=next_power_of_2(half),
    )
    return out


class TritonRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        # kept by reference, not saved (a saved tensor costs a checkpoint's hooks): every layer gets the same cos
        # and sin, which the model's forward made and its checkpoints hold for their recompute anyway
        ctx.cos_sin = (cos, sin)
        return _rope_apply(q, cos, sin, False), _rope_apply(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.cos_sin
        dq = _rope_apply(dq, cos, sin, True) if dq is not None else None
        dk = _rope_apply(dk, cos, sin, True) if dk is not None else None
        return dq, dk, None, None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """transformers' apply_rotary_pos_emb, verbatim."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def apply_rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Drop-in for ``apply_rotary_pos_emb``: q (B, Hq, S, D), k (B, Hk, S, D), cos/sin (B, S, D)."""
    if unsqueeze_dim == 1 and use_triton(q, k, cos, sin) and q.dtype != torch.float64 and q.shape[-1] % 2 == 0:
        return TritonRope.apply(q, k, cos, sin)
    return rope_reference(q, k, cos, sin, unsqueeze_dim)
