"""FP8 base weights (kernels/fp8.py) and the quantising producers (RMSNorm, GLU), under the Triton interpreter.

Two kinds of tolerance: the fused quantisers are compared bit for bit with the torch reference (same e4m3 grid,
round-half-even); the FP8 GEMMs against (a) the exact quantised algebra in fp32 (1e-5: only summation order differs)
and (b) the unquantised fp32 result (5e-2: e4m3 keeps 3 mantissa bits, ~2-3% relative error on random data).
"""

import _kernel_env  # noqa: F401
import pytest
import torch
from _kernel_env import assert_close_rel, triton_active

from onecard.kernels.fp8 import (E4M3, Fp8Weight, fp8_linear, fp8_linear_reference, quantize_rows,
                                 quantize_rows_reference)
from onecard.kernels.glu import glu_backward, glu_backward_fp8, glu_forward, glu_forward_fp8
from onecard.kernels.lora_linear import lora_projections, lora_projections_reference
from onecard.kernels.lora_mlp import lora_mlp, lora_mlp_reference
from onecard.kernels.rms_norm import fp8_rows_of, rms_norm

needs_triton = pytest.mark.skipif(not triton_active(), reason="needs triton (interpreter on CPU)")


def _same_bits(a, b, what=""):
    assert a.dtype == b.dtype == E4M3, what
    diff = (a.view(torch.uint8) != b.view(torch.uint8)).sum().item()
    assert diff == 0, f"{what}: {diff} e4m3 codes differ"


@needs_triton
@pytest.mark.parametrize("cols", [48, 300, 2049, 5000])
@pytest.mark.parametrize("with_col_scale", [False, True])
def test_quantize_rows_matches_reference_bit_for_bit(cols, with_col_scale):
    torch.manual_seed(cols)
    x = torch.randn(6, cols) * 3
    x[1] = 0.0  # an all-zero row: tiny scale, zero codes, no NaN
    x[2, :7] = torch.tensor([1e-6, -1e-7, 448.0, 31.0, 100.0, -3.3, 1e-3])
    cs = torch.rand(cols) + 0.25 if with_col_scale else None
    q, s = quantize_rows(x, cs)
    qr, sr = quantize_rows_reference(x, cs)
    _same_bits(q, qr, "codes")
    assert torch.equal(s, sr)
    assert not torch.isnan(q.float()).any()
    src = x if cs is None else x * cs
    assert_close_rel(q.float() * s, src, 6e-2, "dequantised")  # e4m3 rounding, not something grosser


@needs_triton
@pytest.mark.parametrize("shape", [(64, 64), (70, 130), (1, 300), (257, 65)])
def test_transpose_bytes_matches_torch_on_ragged_tiles(shape):
    from onecard.kernels.fp8 import transpose_bytes, transpose_bytes_reference

    torch.manual_seed(shape[1])
    q = (torch.randn(*shape) * 50).to(E4M3)
    t = transpose_bytes(q)
    assert t.shape == (shape[1], shape[0]) and t.is_contiguous() and t.dtype == E4M3
    _same_bits(t, transpose_bytes_reference(q), "transposed codes")
    w = Fp8Weight.from_dense(torch.randn(*shape))
    assert w.transposed().t().is_contiguous()  # the column-major operand the backward GEMM takes
    _same_bits(w.transposed().t().contiguous(), w.qdata.t().contiguous(), "Fp8Weight.transposed")


@pytest.mark.parametrize("accumulate", [False, True])
def test_scaled_mm_into_adds_onto_its_output(accumulate):
    """out (+)= diag(t) (X_q W_rows^T) diag(s): on the CPU the emulated product, added or written."""
    from onecard.kernels.fp8 import scaled_mm_into

    torch.manual_seed(8)
    w = Fp8Weight.from_dense(torch.randn(48, 32))
    xq, t = quantize_rows_reference(torch.randn(5, 32))
    out = torch.randn(5, 48)
    want = (xq.float() * t) @ w.dequantize(torch.float32).t() + (out if accumulate else 0)
    got = scaled_mm_into(out, xq, t, w.qdata, w.scale, accumulate)
    assert got is out
    assert_close_rel(out, want, 1e-6, "out")


def test_weight_scales_are_per_output_channel():
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    w[3] *= 1000.0  # one large row must not coarsen the others
    fw = Fp8Weight.from_dense(w)
    assert fw.scale.shape == (40,)
    assert torch.allclose(fw.scale, w.abs().amax(1) / 448.0)
    err = (fw.dequantize(torch.float32) - w).abs() / w.abs().amax(1, keepdim=True)
    assert float(err.max()) <= 2.0**-4 * 448 / 448  # half an e4m3 step at the row's top binade
    assert fw.nbytes() == 40 * 24 + 40 * 4


@needs_triton
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_is_the_quantised_algebra(bias):
    torch.manual_seed(1)
    x = torch.randn(2, 9, 64, requires_grad=True)
    w = Fp8Weight.from_dense(torch.randn(48, 64) / 8)
    b = torch.randn(48) if bias else None
    y = fp8_linear(x, w, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    # exact algebra: y = diag(t) Xq Q^T diag(s);  dx = diag(u) rowquant(dy diag(s)) Q
    x2, dy2 = x.detach().reshape(-1, 64), dy.reshape(-1, 48)
    xq, t = quantize_rows_reference(x2)
    expect = (xq.float() * t) @ (w.qdata.float() * w.scale[:, None]).t() + (0 if b is None else b)
    assert_close_rel(y.reshape(-1, 48), expect, 1e-5, "y")
    dq, u = quantize_rows_reference(dy2, w.scale)
    assert_close_rel(x.grad.reshape(-1, 64), (dq.float() * u) @ w.qdata.float(), 1e-5, "dx")
    # and close to the unquantised linear
    x.grad = None
    ref = fp8_linear_reference(x, w, b)
    ref.backward(dy)
    assert_close_rel(y, ref, 5e-2, "y vs unquantised")


@needs_triton
def test_rms_norm_attaches_its_fp8_copy():
    torch.manual_seed(2)
    x = torch.randn(3, 5, 96)
    w = torch.rand(96) + 0.5
    y = rms_norm(x, w, 1e-6, fp8=True)
    q, s = fp8_rows_of(y)
    qr, sr = quantize_rows_reference(y.reshape(-1, 96))
    _same_bits(q, qr, "rms codes")
    assert torch.equal(s, sr)
    assert torch.equal(y, rms_norm(x, w, 1e-6))  # the bf16/fp32 output is unchanged
    assert fp8_rows_of(rms_norm(x, w, 1e-6)) is None


@needs_triton
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("cols", [40, 1500])
def test_glu_fp8_forward_and_backward(gelu, cols):
    torch.manual_seed(3)
    g, u, dh = (torch.randn(7, cols) * 2 for _ in range(3))
    cg, cu = torch.rand(cols) + 0.1, torch.rand(cols) + 0.1
    h, (q, s) = glu_forward_fp8(g, u, gelu)
    assert torch.equal(h, glu_forward(g, u, gelu))
    qr, sr = quantize_rows_reference(h)
    _same_bits(q, qr, "h codes")
    assert torch.equal(s, sr)
    ref = glu_backward(dh, g, u, gelu)
    for inplace in (False, True):
        args = [t.clone() for t in (dh, g, u)]
        h2, dg, du, (qg, sg), (qu, su) = glu_backward_fp8(*args, cg, cu, gelu, inplace=inplace)
        for a, b in zip((h2, dg, du), ref):
            assert torch.equal(a, b)
        for (qq, ss), (d, c) in (((qg, sg), (ref[1], cg)), ((qu, su), (ref[2], cu))):
            qr, sr = quantize_rows_reference(d, c)
            _same_bits(qq, qr, f"grad codes inplace={inplace}")
            assert torch.equal(ss, sr)


def _proj(out_f, in_f, rank, fp8, seed, adapter=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    a = (torch.randn(rank, in_f, generator=g) / in_f**0.5).requires_grad_() if adapter else None
    b = (torch.randn(out_f, rank, generator=g) * 0.1).requires_grad_() if adapter else None
    return (Fp8Weight.from_dense(w) if fp8 else w, a, b, 2.0)


@needs_triton
def test_fused_lora_projections_on_fp8_weights():
    torch.manual_seed(4)
    x = torch.randn(2, 11, 64, requires_grad=True)
    parts = [_proj(64, 64, 4, True, 10), _proj(32, 64, 4, True, 11), _proj(32, 64, 4, True, 12, adapter=False)]
    outs = lora_projections(x, parts)
    dys = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, dys)
    got = [x.grad] + [t.grad for p in parts[:2] for t in p[1:3]]
    for t in [x] + [t for p in parts[:2] for t in p[1:3]]:
        t.grad = None
    dense = [(p[0].dequantize(torch.float32), *p[1:]) for p in parts]  # same W values, x and dy not quantised
    refs = lora_projections_reference(x, dense)
    torch.autograd.backward(refs, dys)
    want = [x.grad] + [t.grad for p in parts[:2] for t in p[1:3]]
    for o, r in zip(outs, refs):
        assert_close_rel(o, r, 5e-2, "out")
    for a, b in zip(got, want):
        assert_close_rel(a, b, 5e-2, "grad")
    # the producer's copy of x gives the same result as quantising here
    xq = quantize_rows(x.detach().reshape(-1, 64))
    again = lora_projections(x.detach(), parts, x_fp8=xq)
    for a, b in zip(again, outs):
        assert torch.equal(a, b.detach())


@needs_triton
def test_fused_lora_mlp_on_fp8_weights():
    torch.manual_seed(5)
    x = torch.randn(3, 7, 32, requires_grad=True)
    gate, up, down = _proj(80, 32, 4, True, 20), _proj(80, 32, 4, True, 21), _proj(32, 80, 4, True, 22)
    y = lora_mlp(x, gate, up, down)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [x] + [t for p in (gate, up, down) for t in p[1:3]]
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    dq = [(p[0].dequantize(torch.float32), *p[1:]) for p in (gate, up, down)]
    ref = lora_mlp_reference(x, *dq)
    ref.backward(dy)
    assert_close_rel(y, ref, 5e-2, "y")
    for a, t in zip(got, leaves):
        assert_close_rel(a, t.grad, 6e-2, "grad")


_COMPILE_SM90 = r"""
import json, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from onecard.kernels import fp8, rms_norm, glu
cases = {
 "quant_rows": (fp8._quant_rows, {"X": "*bf16", "CS": "*fp32", "Q": "*fp8e4nv", "S": "*fp32", "stride_x": "i32", "stride_q": "i32", "n_cols": "i32", "HAS_CS": "constexpr", "CHUNK": "constexpr"}, {"HAS_CS": True, "CHUNK": 2048}, 8),
 "rms_fwd_fp8": (rms_norm._rms_fwd, {"X": "*bf16", "W": "*bf16", "Y": "*bf16", "RSTD": "*fp32", "Q": "*fp8e4nv", "S": "*fp32", "stride_x": "i32", "stride_y": "i32", "n_cols": "i32", "eps": "fp32", "GEMMA": "constexpr", "FP8": "constexpr", "BLOCK": "constexpr"}, {"GEMMA": False, "FP8": True, "BLOCK": 4096}, 8),
 "glu_fwd_fp8": (glu._glu_fwd_fp8, {"G": "*bf16", "U": "*bf16", "H": "*bf16", "Q": "*fp8e4nv", "S": "*fp32", "n_cols": "i32", "GELU": "constexpr", "CHUNK": "constexpr"}, {"GELU": False, "CHUNK": 1024}, 4),
 "glu_bwd_fp8": (glu._glu_bwd_fp8, {"DH": "*bf16", "G": "*bf16", "U": "*bf16", "H": "*bf16", "DG": "*bf16", "DU": "*bf16", "CG": "*fp32", "CU": "*fp32", "QG": "*fp8e4nv", "SG": "*fp32", "QU": "*fp8e4nv", "SU": "*fp32", "n_cols": "i32", "GELU": "constexpr", "CHUNK": "constexpr"}, {"GELU": False, "CHUNK": 1024}, 4),
}
out = {}
for name, (fn, sig, consts, warps) in cases.items():
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = tempfile.mktemp(suffix=".ptx"); open(ptx, "w").write(k.asm["ptx"])
    r = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", ptx, "-o", "/dev/null"], capture_output=True, text=True, check=True)
    out[name] = int(re.search(r"([0-9]+) bytes spill stores", r.stdout + r.stderr).group(1))
    out[name + "_cvt"] = len(re.findall(r"cvt\.rn\.satfinite\.e4m3x2", k.asm["ptx"])) > 0
    out[name + "_inexact_div"] = len(re.findall(r"div\.(full|approx)\.f32", k.asm["ptx"]))
print(json.dumps(out))
"""


def test_fp8_kernels_compile_for_sm90_exactly_and_without_spills():
    """The interpreter does not run Triton's compiler: compile each quantising kernel for sm_90 here (no GPU needed):
    no register spills, the hardware's round-to-nearest e4m3 conversion, and in the row quantiser IEEE divisions
    only (Triton's fp32 ``/`` is div.full / div.approx, a last bit off torch's, which flips codes; the scale and code
    use tl.math.div_rn). The GLU's sigmoid and the RMSNorm's rstd keep their approximate divisions, as before."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "ptxas" in out.stderr and "No such file" in out.stderr:
        pytest.skip("triton's bundled ptxas is missing")
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("quant_rows", "rms_fwd_fp8", "glu_fwd_fp8", "glu_bwd_fp8"):
        assert res[name] == 0 and res[name + "_cvt"], (name, res)
    assert res["quant_rows_inexact_div"] == 0, res  # its only divisions are the scale's and the code's


def test_fp8_projection_with_frozen_bias_and_dora_on_fp8_weights():
    """A frozen bias (Qwen2's q/k/v) is added after the FP8 GEMM; DoRA on an FP8 W runs on its dequantised values
    (x not quantised): the same as the reference on those values to fp32 precision."""
    torch.manual_seed(6)
    x = torch.randn(13, 48, requires_grad=True)
    w, a, b, s = _proj(32, 48, 4, True, 30)
    bias = torch.randn(32)
    (y,) = lora_projections(x, [(w, a, b, s, bias)])
    xq = quantize_rows_reference(x.detach())
    expect = ((xq[0].float() * xq[1]) @ w.dequantize(torch.float32).t() + bias
              + s * (x.detach() @ a.detach().t()) @ b.detach().t())
    assert_close_rel(y, expect, 1e-5, "biased fp8 projection")
    m = (torch.rand(32) + 0.5).requires_grad_()
    (yd,) = lora_projections(x, [(w, a, b, s, None, m)])
    dy = torch.randn_like(yd)
    yd.backward(dy)
    got = [t.grad.clone() for t in (x, a, b, m)]
    for t in (x, a, b, m):
        t.grad = None
    (ref,) = lora_projections_reference(x, [(w.dequantize(torch.float32), a, b, s, None, m)])
    ref.backward(dy)
    assert_close_rel(yd, ref, 1e-5, "dora y")
    for g, t in zip(got, (x, a, b, m)):
        assert_close_rel(g, t.grad, 1e-4, "dora grad")


def test_dora_mlp_on_fp8_weights_is_dora_on_their_values():
    torch.manual_seed(7)
    x = torch.randn(2, 5, 32, requires_grad=True)
    parts = [(*_proj(o, i, 4, True, 40 + k), None, (torch.rand(o) + 0.5).requires_grad_())
             for k, (o, i) in enumerate(((80, 32), (80, 32), (32, 80)))]
    for skip in (False, True):
        y = lora_mlp(x, *parts, skip_output=skip)
        assert y.shape == (2, 5, 32)
    y = lora_mlp(x, *parts)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [x] + [t for p in parts for t in (p[1], p[2], p[5])]
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    dense = [(p[0].dequantize(torch.float32), *p[1:]) for p in parts]
    ref = lora_mlp_reference(x, *dense)
    ref.backward(dy)
    assert_close_rel(y, ref, 1e-5, "y")
    for g, t in zip(got, leaves):
        assert_close_rel(g, t.grad, 1e-4, "grad")
