"""RMSNorm as a Triton kernel with a hand-derived backward, matching transformers' casting exactly.

Two casting conventions exist in transformers 5.17 (modeling_llama.py / modeling_gemma.py):
  llama  (Llama, Mistral, Qwen2): y = w * (x * r).to(x.dtype)        -> dtype promote(w, x)
  gemma  (Gemma, Gemma 2):        y = ((x * r) * (1 + w.float())).to(x.dtype)
with r = rsqrt(mean(x^2) + eps) computed in fp32. The kernel computes in fp32 and rounds where
transformers rounds, so bf16 outputs agree bit-for-bit up to rsqrt's last ulp.

Backward (one row, H columns, n = x r, effective weight v = w or 1 + w, dy upstream):
    y = v * n,   dn = dy * v
    r = (mean(x^2) + eps)^(-1/2)  =>  dr/dx_j = -r^3 x_j / H
    dx_j = dn_j r + sum_i dn_i x_i (dr/dx_j) = r (dn_j - n_j * mean_i(dn_i n_i))
    dw = sum over rows of dy * n   (llama: n rounded to x's dtype first, as transformers' graph does)
dw is summed per program into an fp32 (programs x H) buffer, then over programs in torch.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, row_block, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .fp8 import e4m3_code, e4m3_scale

    @triton.jit
    def _rms_fwd(X, W, Y, RSTD, Q, S, stride_x, stride_y, n_cols, eps, GEMMA: tl.constexpr, FP8: tl.constexpr,
                 BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        n = x * rstd
        if GEMMA:
            y = n * (w + 1.0)
        else:
            y = n.to(X.dtype.element_ty).to(tl.float32) * w
        y = y.to(Y.dtype.element_ty)
        tl.store(Y + row * stride_y + cols, y, mask=mask)
        tl.store(RSTD + row, rstd)
        if FP8:  # the row-wise e4m3 copy of the rounded output, for an FP8 GEMM reading it (kernels/fp8.py)
            yf = y.to(tl.float32)
            scale = e4m3_scale(tl.max(tl.abs(yf), axis=0))
            q = e4m3_code(yf, scale)
            tl.store(Q + row * n_cols + cols, q.to(Q.dtype.element_ty), mask=mask)
            tl.store(S + row, scale)

    @triton.jit
    def _rms_bwd(
        DY, X, W, RSTD, DX, DW, stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_prog: tl.constexpr,
        GEMMA: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if GEMMA:
            w = w + 1.0
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(0, rows_per_prog):
            row = pid * rows_per_prog + i
            row64 = row.to(tl.int64)
            # One block-vs-scalar compare: `mask & (row < n_rows)` (block & scalar i1) is mis-typed by
            # Triton 3.9's CPU interpreter ("mask has unsupported dtype"); compiled, both are the same IR.
            m = cols < tl.where(row < n_rows, n_cols, 0)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
            x = tl.load(X + row64 * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row64, mask=row < n_rows, other=0.0)
            n = x * rstd
            dn = dy * w
            dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / n_cols))
            tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=m)
            if GEMMA:
                dw += dy * n
            else:
                dw += dy * n.to(X.dtype.element_ty).to(tl.float32)
        tl.store(DW + pid * n_cols + cols, dw, mask=mask)


def _n_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, 4 * sms))
    return max(1, min(n_rows, 4))  # interpreter: few programs, fast


class TritonRMSNorm(torch.autograd.Function):
    """Returns (y, q, scale): q, scale the row-wise e4m3 copy of y when ``fp8`` (else empty), not differentiable."""

    @staticmethod
    def forward(ctx, x, weight, eps, gemma, fp8=False):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_rows, n_cols = x2.shape
        out_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        q = torch.empty((n_rows if fp8 else 0, n_cols), dtype=torch.float8_e4m3fn, device=x.device)
        scale = torch.empty((n_rows if fp8 else 0, 1), dtype=torch.float32, device=x.device)
        block, warps = row_block(n_cols)
        _rms_fwd[(n_rows,)](x2, weight, y, rstd, q if fp8 else y, scale if fp8 else rstd, x2.stride(0), y.stride(0),
                            n_cols, eps, GEMMA=gemma, FP8=fp8, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2, rstd)
        # the weight, a parameter, kept by reference: a saved tensor costs a checkpoint's hooks (lora_linear.py
        # keep_for_backward)
        ctx.weight, ctx.gemma, ctx.shape = weight, gemma, shape
        ctx.mark_non_differentiable(q, scale)
        return y.view(*shape[:-1], n_cols), q, scale

    @staticmethod
    def backward(ctx, dy, _dq=None, _ds=None):
        (x2, rstd), weight = ctx.saved_tensors, ctx.weight
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        progs = _n_programs(n_rows, x2.device)
        rows_per_prog = -(-n_rows // progs)
        dw_part = torch.empty((progs, n_cols), dtype=torch.float32, device=x2.device)
        block, warps = row_block(n_cols)
        _rms_bwd[(progs,)](dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0), dx.stride(0),
                           n_rows, n_cols, rows_per_prog, GEMMA=ctx.gemma, BLOCK=block, num_warps=warps)
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None, None, None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """transformers' own formulas (LlamaRMSNorm / GemmaRMSNorm.forward in 5.17), line for line."""
    if gemma:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (out * (1.0 + weight.float())).type_as(x)
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, gemma: bool = False,
             fp8: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim; ``gemma=True`` for the (1 + weight) variant. Triton where it can run.

    ``fp8``: the kernel also writes the output's row-wise e4m3 copy, attached to it as ``FP8_ATTR`` (q, scale), so
    an FP8 GEMM that reads this output (kernels/fp8.py) needs no separate quantisation pass over it."""
    if use_triton(x, weight) and x.dtype != torch.float64:
        y, q, scale = TritonRMSNorm.apply(x, weight, float(eps), bool(gemma), bool(fp8))
        if fp8:
            setattr(y, FP8_ATTR, (q, scale))
        return y
    return rms_norm_reference(x, weight, eps, gemma)


FP8_ATTR = "_onecard_fp8_rows"  # on a producer's output: its row-wise e4m3 copy (q (N x C), scale (N x 1))


def fp8_rows_of(x: torch.Tensor):
    """The row-wise e4m3 copy a producer attached to ``x`` (:func:`rms_norm` with fp8), or None."""
    return getattr(x, FP8_ATTR, None)
