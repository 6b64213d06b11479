"""FP8 (e4m3) frozen weights: row-wise quantisation, the scaled GEMMs of a frozen linear, and an autograd linear.

A frozen W (out x in) is stored as W = diag(s) Q with Q in float8_e4m3fn and s (out,) fp32, s_o = max_i |W_oi| / 448
(per output channel). An activation x (N x in) is quantised the same way per row: x = diag(t) X_q.

Forward (and a checkpoint's recompute):
    y = x W^T = diag(t) (X_q Q^T) diag(s)        torch._scaled_mm(X_q, Q^T, scale_a=t (N x 1), scale_b=s (1 x out))
Backward input gradient (upstream dy, N x out): W's scales lie on the contraction dim of dy W, so they are folded
into dy before it is quantised, not into the GEMM:
    dx = dy W = (dy diag(s)) Q = diag(u) (D_q Q)   with D_q = rowquant(dy diag(s)), u its row scales
which is exact up to D_q's rounding, keeps one FP8 copy of W (1 byte per weight + 4 bytes per row) and needs no
tensor-wise scale. cuBLASLt's FP8 GEMM takes its second operand column-major only (the "TN" layout), so the backward
reads Q through a transposed copy made per use (``Fp8Weight.transposed``: 58.7 MB for Llama 3 8B's down projection,
a memory-bound pass of about 30 us at the H200's 4.8 TB/s, against a 0.8 ms GEMM), not a second stored copy (which
would bring the base back to bf16's 2 bytes per weight). The copy is a tiled Triton transpose
(:func:`transpose_bytes`): torch's ``.t().contiguous()`` on 1-byte elements runs a generic strided copy, measured on
the H200 at 40 ms per Llama 3 8B step (224 copies, ~350 GB/s; bench/results/profile_fp8_pair_2026-12-03.json).
torchao's Float8 rowwise training recipe does the same per-row scaling of the activations and gradients
(torchao/float8/config.py, ``Float8LinearRecipeName.ROWWISE``), but quantises W again each step for its trainable
weight; Unsloth's FP8 LoRA keeps a frozen row-wise FP8 W and runs fbgemm's GEMM. Neither is on the GPU machine here,
and torch._scaled_mm measured 1,185-1,349 TFLOP/s on the 8B shapes (docs/kernels.md).

Quantisation is the memory-bound part (0.5 ms for a 16k x 4096 activation in plain torch on the H200): the Triton
kernels here quantise row-wise in one read of the source (:func:`quantize_rows`, with an optional per-column
pre-scale for the gradients), and the RMSNorm and GLU kernels (rms_norm.py, glu.py) emit the quantised copy beside
their bf16 output, so a producer's output is quantised while it is still in registers.

CPU: torch._scaled_mm has no CPU kernel for these layouts, so :func:`scaled_mm` emulates it in fp32 on CPU tensors
(tests only: loading an FP8 base refuses the CPU, train/model.py).
"""

from __future__ import annotations

import logging

import torch

from ._triton import HAS_TRITON, next_power_of_2, use_triton
from .cublaslt import matmul_into

log = logging.getLogger("onecard.kernels")

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_AMAX = 1e-12  # an all-zero row gets a tiny scale, not a division by zero
_CHUNK = 2048  # columns per step of the two-pass row kernels

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def e4m3_rounded(v):
        """v (fp32, |v| <= 448) rounded to nearest-even on the e4m3 grid, so the cast that follows is exact: the same
        values as the hardware's cvt.rn.satfinite, and correct under Triton 3.9's CPU interpreter, whose fp8 cast
        mis-rounds across a binade (31.0 -> 16.0). Spacing 2^(e-3) for exponent e >= -6, 2^-9 below (subnormals)."""
        bits = v.to(tl.int32, bitcast=True)
        e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
        step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
        inv_step = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)  # exact powers of two: no division
        r = tl.abs(v) * inv_step
        r = ((r + 12582912.0) - 12582912.0) * step  # 1.5 * 2^23: round half to even for |r| < 2^22
        # the sign bit OR-ed back in (r >= 0): also on -0.0 and on negatives that round to zero, as torch's cast
        # keeps it; a negation compiled for CUDA as 0 - r gave +0.0 there (H200: 2 of 1M codes)
        sign = bits & -2147483648
        return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def e4m3_scale(amax):
        """A row's scale, amax / 448 (a zero row: 1e-12 / 448), with IEEE division: Triton's ``/`` on fp32 compiles
        to div.full/div.approx, which differ from torch's division in the last bit (and so would flip codes)."""
        return tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)

    @triton.jit
    def e4m3_code(x, scale):
        """x / scale (IEEE) clamped to +-448 and rounded onto the e4m3 grid, in fp32: the value the cast stores."""
        return e4m3_rounded(tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0))

    @triton.jit
    def _quant_rows(X, CS, Q, S, stride_x, stride_q, n_cols, HAS_CS: tl.constexpr, CHUNK: tl.constexpr):
        """Row r: amax over (x * cs), then q = x * cs / scale, scale = amax / 448 (two passes over the row)."""
        row = tl.program_id(0).to(tl.int64)
        amax = tl.zeros((CHUNK,), dtype=tl.float32)
        for c0 in range(0, n_cols, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            m = cols < n_cols
            x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_CS:
                x = x * tl.load(CS + cols, mask=m, other=0.0)
            amax = tl.maximum(amax, tl.abs(x))
        scale = e4m3_scale(tl.max(amax, axis=0))
        for c0 in range(0, n_cols, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            m = cols < n_cols
            x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_CS:
                x = x * tl.load(CS + cols, mask=m, other=0.0)
            q = e4m3_code(x, scale)
            tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=m)
        tl.store(S + row, scale)


if HAS_TRITON:

    @triton.jit
    def _transpose_bytes(X, Y, n_rows, n_cols, BLOCK: tl.constexpr):
        """Y (n_cols x n_rows) = X^T for 1-byte elements, one BLOCK x BLOCK tile per program: loads along X's rows
        and stores along Y's are both contiguous (the tile is transposed on chip)."""
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = (r[:, None] < n_rows) & (c[None, :] < n_cols)
        tile = tl.load(X + r[:, None].to(tl.int64) * n_cols + c[None, :], mask=m)
        tl.store(Y + c[:, None].to(tl.int64) * n_rows + r[None, :], tl.trans(tile), mask=tl.trans(m))


def transpose_bytes_reference(q: torch.Tensor) -> torch.Tensor:
    return q.t().contiguous()


def transpose_bytes(q: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of q^T for a contiguous 2-D tensor of 1-byte elements (e4m3 codes)."""
    if not use_triton(q) or q.element_size() != 1 or not q.is_contiguous():
        return transpose_bytes_reference(q)
    n_rows, n_cols = q.shape
    out = torch.empty((n_cols, n_rows), dtype=torch.uint8, device=q.device)
    block = 64
    _transpose_bytes[(triton.cdiv(n_rows, block), triton.cdiv(n_cols, block))](q.view(torch.uint8), out, n_rows,
                                                                               n_cols, BLOCK=block, num_warps=4)
    return out.view(q.dtype)


def quantize_rows_reference(x: torch.Tensor, col_scale: torch.Tensor | None = None):
    """(q, scale): x * col_scale = diag(scale) q row-wise, q in e4m3, scale (N, 1) fp32."""
    xf = x.float() if col_scale is None else x.float() * col_scale.float()
    amax = xf.abs().amax(dim=1, keepdim=True).clamp_min(MIN_AMAX)
    # Divided by a tensor, not the Python float: CUDA torch divides by a scalar as a multiplication by its
    # reciprocal, a last-bit difference in the scale that flips codes at rounding ties (seen on the H200: 776 of
    # 1M codes); tensor / tensor is IEEE division on every device, as the Triton kernels' div_rn.
    scale = amax / torch.full_like(amax, E4M3_MAX)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_rows(x: torch.Tensor, col_scale: torch.Tensor | None = None):
    """Row-wise e4m3 quantisation of a 2-D x (optionally of x * col_scale, col_scale fp32 per column): (q, scale)."""
    if not use_triton(x) or x.dtype == torch.float64:
        return quantize_rows_reference(x, col_scale)
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_rows, n_cols = x.shape
    q = torch.empty((n_rows, n_cols), dtype=E4M3, device=x.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device)
    cs = col_scale if col_scale is not None else scale  # a dummy pointer when unused
    chunk = min(_CHUNK, next_power_of_2(n_cols))
    _quant_rows[(n_rows,)](x, cs, q, scale, x.stride(0), q.stride(0), n_cols, HAS_CS=col_scale is not None,
                           CHUNK=chunk, num_warps=4 if chunk <= 1024 else 8)
    return q, scale


def quantize_weight(w: torch.Tensor):
    """(Q, s) for a frozen (out x in) weight, per output channel, 64 MiB of rows at a time (no whole fp32 copy)."""
    rows = max(1, (1 << 24) // w.shape[1])
    parts = [quantize_rows_reference(w[i:i + rows]) for i in range(0, w.shape[0], rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).view(-1)


class Fp8Weight:
    """A frozen e4m3 weight Q (out x in, row-major) with per-output-channel fp32 scales s: W = diag(s) Q.
    Not a tensor: the fused ops recognise it (:func:`is_fp8`) and never ask autograd for its gradient."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self.qdata, self.scale, self.dtype = qdata, scale, dtype  # dtype: what the layer computes and returns in
        self._ones = None

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> "Fp8Weight":
        q, s = quantize_weight(w.detach())
        return cls(q, s, w.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.qdata.shape

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    def nbytes(self) -> int:
        return self.qdata.numel() * self.qdata.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.qdata.float() * self.scale[:, None]).to(dtype or self.dtype)

    def transposed(self) -> torch.Tensor:
        """Q as the column-major (out x in) operand the backward GEMM dy_q Q takes: a copy per use."""
        return transpose_bytes(self.qdata).t()

    def ones_in(self) -> torch.Tensor:
        """(1 x in) unit column scales for the backward GEMM (W's scales are folded into dy)."""
        if self._ones is None or self._ones.device != self.qdata.device:
            self._ones = torch.ones((1, self.qdata.shape[1]), dtype=torch.float32, device=self.qdata.device)
        return self._ones


def is_fp8(w) -> bool:
    return isinstance(w, Fp8Weight)


# Forward GEMMs (and a checkpoint's recompute) accumulate without cuBLASLt's periodic fp32 promotion, the input
# gradient's with it: torchao's float8 training does the same (torchao/float8/config.py: use_fast_accum for the output
# GEMM only). On the 8B shapes it runs gate/up 1.65 -> 1.49 ms, q/o 0.43 -> 0.38 ms (bench/fp8_gemm_gpu.py on the
# H200, bench/results/fp8_gemm_2026-12-03.jsonl); its error, a few 1e-3 over K = 4096, sits far below e4m3's rounding
# of the operands (2-3%).
FORWARD_FAST_ACCUM = True


def scaled_mm(a_q, a_scale, b_q, b_scale, out_dtype, fast_accum: bool = False):
    """diag(a_scale) (a_q b_q) diag(b_scale): torch._scaled_mm on CUDA (b_q column-major), fp32 emulation on CPU."""
    if a_q.is_cuda:
        return torch._scaled_mm(a_q, b_q, scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    return ((a_q.float() @ b_q.float()) * a_scale * b_scale).to(out_dtype)


_ADDED_AFTER = []  # the shapes for which the accumulating GEMM was unavailable (said once each)


def scaled_mm_into(out, a_q, a_scale, w_rows, w_scale, accumulate: bool, fast_accum: bool = False):
    """out (+)= diag(a_scale) (a_q w_rows^T) diag(w_scale) in place, ``w_rows`` (N x K) row-major: on CUDA one cuBLASLt
    GEMM that reads ``out`` in its epilogue (kernels/cublaslt.py); elsewhere, or where that has no kernel, the
    product is added after :func:`scaled_mm` (said once per shape)."""
    if out.is_cuda and out.dtype == torch.bfloat16:
        if matmul_into(out, a_q, a_scale.reshape(-1), w_rows, w_scale.reshape(-1), accumulate, fast_accum):
            return out
        shape = (tuple(a_q.shape), tuple(w_rows.shape))
        if shape not in _ADDED_AFTER:
            _ADDED_AFTER.append(shape)
            log.warning("FP8 GEMM %s x %s^T: no accumulating cuBLASLt kernel, adding after torch._scaled_mm "
                        "(one more pass over the output)", *shape)
    prod = scaled_mm(a_q, a_scale.reshape(-1, 1), w_rows.t(), w_scale.reshape(1, -1), out.dtype, fast_accum)
    return out.add_(prod) if accumulate else out.copy_(prod)


def fp8_forward(x: torch.Tensor, w: Fp8Weight, quantized=None, bias=None, out=None) -> torch.Tensor:
    """x W^T (+ bias) for 2-D x; ``quantized``: (X_q, t) made by the producer of x, else x is quantised here.
    ``out``: added into (bias ignored: the caller's ``out`` carries it)."""
    xq, xs = quantized if quantized is not None else quantize_rows(x)
    if out is not None:
        return scaled_mm_into(out, xq, xs, w.qdata, w.scale, accumulate=True, fast_accum=FORWARD_FAST_ACCUM)
    y = scaled_mm(xq, xs, w.qdata.t(), w.scale.view(1, -1), x.dtype, FORWARD_FAST_ACCUM)
    return y if bias is None else y.add_(bias.to(y.dtype))


def fp8_input_grad(dy: torch.Tensor, w: Fp8Weight, quantized=None, out=None) -> torch.Tensor:
    """dy W for 2-D dy; ``quantized``: rowquant(dy diag(s)) made by dy's producer, else made here. ``out``: added
    into."""
    dq, ds = quantized if quantized is not None else quantize_rows(dy, w.scale)
    if out is not None:
        return scaled_mm_into(out, dq, ds, transpose_bytes(w.qdata), w.ones_in(), accumulate=True)
    return scaled_mm(dq, ds, w.transposed(), w.ones_in(), dy.dtype)


class Fp8Linear(torch.autograd.Function):
    """y = x W^T + bias with a frozen Fp8Weight W; backward returns dx only (W and the bias are frozen)."""

    @staticmethod
    def forward(ctx, x, w, bias):
        ctx.w, ctx.shape = w, x.shape
        y = fp8_forward(x.reshape(-1, x.shape[-1]), w, bias=bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        dx = fp8_input_grad(dy.reshape(-1, dy.shape[-1]), ctx.w)
        return dx.view(ctx.shape), None, None


def fp8_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return Fp8Linear.apply(x, w, bias)


def fp8_linear_reference(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain autograd: x (W's dequantised values)^T, in fp32, with x and dy *not* quantised (what FP8 approximates)."""
    y = x.float() @ w.dequantize(torch.float32).t()
    return (y if bias is None else y + bias.float()).to(x.dtype)
