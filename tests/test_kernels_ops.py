"""Parity of onecard's Triton kernels with their PyTorch references (forward and backward).

Tolerances (relative L2 error vs a float64 reference from the same rounded inputs):
fp32 1e-5; bf16 1e-2 (bf16 has 8 mantissa bits: one rounding is ~4e-3 relative).
On CPU these run through TRITON_INTERPRET=1 when triton is installed, else the reference path
(then they only check the reference against float64: said by the skip in test_triton_is_exercised).
"""

import _kernel_env  # noqa: F401  (sets TRITON_INTERPRET before onecard.kernels imports)
import pytest
import torch
from _kernel_env import assert_close_rel, triton_active

from onecard.kernels.glu import geglu, glu_reference, swiglu
from onecard.kernels.rms_norm import rms_norm, rms_norm_reference
from onecard.kernels.rope import apply_rope, rope_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _leaf(t, dtype, device):
    return t.to(device=device, dtype=dtype).requires_grad_()


def test_triton_is_exercised():
    if not triton_active():
        pytest.skip("triton not installed: kernels tested through their reference path only")
    from onecard.kernels._triton import use_triton

    assert use_triton(torch.zeros(1, device=DEVICES[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("shape", [(3, 7, 130), (1, 1, 64), (5, 33)])
def test_rms_norm_parity(dtype, gemma, shape):
    torch.manual_seed(0)
    x0 = torch.randn(*shape) * 3
    w0 = torch.randn(shape[-1]) * 0.1 + (0.0 if gemma else 1.0)
    x, w = _leaf(x0, dtype, "cpu"), _leaf(w0, dtype, "cpu")
    y = rms_norm(x, w, 1e-6, gemma=gemma)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = _leaf(x.detach(), torch.float64, "cpu"), _leaf(w.detach(), torch.float64, "cpu")
    ref = rms_norm_reference(x64, w64, 1e-6, gemma=gemma)
    ref.backward(dy.double())
    assert y.dtype == rms_norm_reference(x.detach(), w.detach(), 1e-6, gemma).dtype
    assert_close_rel(y, ref, TOL[dtype], "y")
    assert_close_rel(x.grad, x64.grad, TOL[dtype], "dx")
    assert_close_rel(w.grad, w64.grad, TOL[dtype], "dw")


def test_rms_norm_matches_hf_rounding_in_bf16():
    """Same rounding points as transformers: elementwise within one bf16 ulp (2^-7 relative) when
    compiled; two under the CPU interpreter, whose fp32->bf16 casts truncate instead of rounding
    to nearest (triton 3.6 interpreter, checked here: about half of random casts differ)."""
    from onecard.kernels._triton import INTERPRET

    ulps = 2 if INTERPRET else 1
    torch.manual_seed(1)
    x = (torch.randn(4, 96) * 5).bfloat16()
    w = (torch.randn(96) * 0.2 + 1).bfloat16()
    for gemma in (False, True):
        y, ref = rms_norm(x, w, 1e-6, gemma), rms_norm_reference(x, w, 1e-6, gemma)
        ulp = ref.float().abs().clamp(min=1e-3) * 2**-7 * ulps
        assert ((y.float() - ref.float()).abs() <= ulp).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 77), (2, 1029)])
def test_glu_parity(dtype, gelu, shape):
    torch.manual_seed(0)
    g, u = _leaf(torch.randn(*shape) * 2, dtype, "cpu"), _leaf(torch.randn(*shape), dtype, "cpu")
    h = (geglu if gelu else swiglu)(g, u)
    dh = torch.randn_like(h)
    h.backward(dh)
    g64, u64 = _leaf(g.detach(), torch.float64, "cpu"), _leaf(u.detach(), torch.float64, "cpu")
    ref = glu_reference(g64, u64, gelu)
    ref.backward(dh.double())
    assert_close_rel(h, ref, TOL[dtype], "h")
    assert_close_rel(g.grad, g64.grad, TOL[dtype], "dg")
    assert_close_rel(u.grad, u64.grad, TOL[dtype], "du")


@pytest.mark.parametrize("gelu", [False, True])
def test_glu_backward_in_place_equals_out_of_place(gelu):
    """inplace=True writes h over dh, dg over g, du over u, with the same values as fresh outputs."""
    from onecard.kernels.glu import glu_backward

    torch.manual_seed(0)
    g, u, dh = torch.randn(4, 1029, dtype=torch.bfloat16) * 2, torch.randn(4, 1029, dtype=torch.bfloat16), \
        torch.randn(4, 1029, dtype=torch.bfloat16)
    fresh = glu_backward(dh.clone(), g.clone(), u.clone(), gelu)
    bufs = dh.clone(), g.clone(), u.clone()
    got = glu_backward(*bufs, gelu, inplace=True)
    for a, b in zip(got, fresh):
        assert torch.equal(a, b)
    if triton_active():  # the Triton path really reused the buffers
        assert all(a.data_ptr() == b.data_ptr() for a, b in zip(got, bufs))


def _cos_sin(bsz, seq, dim, dtype, offset=0):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    pos = torch.arange(offset, offset + seq).float()[None].expand(bsz, -1)
    emb = torch.cat([pos[..., None] * inv, pos[..., None] * inv], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(6, 2), (3, 3)])
@pytest.mark.parametrize("dim", [24, 64])
def test_rope_parity(dtype, heads, dim):
    """q/k as transformers makes them: (B, S, H, D) transposed to (B, H, S, D), i.e. strided."""
    torch.manual_seed(0)
    bsz, seq = 2, 7
    q = _leaf(torch.randn(bsz, seq, heads[0], dim), dtype, "cpu")
    k = _leaf(torch.randn(bsz, seq, heads[1], dim), dtype, "cpu")
    cos, sin = _cos_sin(bsz, seq, dim, dtype, offset=3)
    qo, ko = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    ((qo * dq).sum() + (ko * dk).sum()).backward()
    q64, k64 = _leaf(q.detach(), torch.float64, "cpu"), _leaf(k.detach(), torch.float64, "cpu")
    qr, kr = rope_reference(q64.transpose(1, 2), k64.transpose(1, 2), cos.double(), sin.double())
    ((qr * dq.double()).sum() + (kr * dk.double()).sum()).backward()
    for a, b, name in ((qo, qr, "q"), (ko, kr, "k"), (q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk")):
        assert_close_rel(a, b, TOL[dtype], name)


def test_bf16_large_inputs_stay_finite():
    """Activations of 1e3-1e4 (Llama 3 hidden states exceed fp16's range) must not overflow to NaN."""
    x = (torch.randn(4, 256) * 3e3).bfloat16()
    w = torch.ones(256).bfloat16()
    assert torch.isfinite(rms_norm(x, w, 1e-5)).all()
    g = (torch.randn(4, 256) * 50).bfloat16()
    assert torch.isfinite(swiglu(g, g)).all() and torch.isfinite(geglu(g, g)).all()


def test_norm_and_rope_save_only_what_backward_cannot_read_elsewhere():
    """The RMSNorm weight (a parameter) and RoPE's cos/sin (shared by every layer) are kept on ctx, not saved:
    each saved tensor costs a checkpoint three hook calls a step. RMSNorm saves its input and 1/rms."""
    if not triton_active():
        pytest.skip("the Triton ops (the references save what autograd saves)")
    saved = []
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(64, dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(2, 4, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = torch.randn(2, 8, 16, dtype=torch.bfloat16), torch.randn(2, 8, 16, dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = rms_norm(x, w, 1e-6)
        assert [tuple(t.shape) for t in saved] == [(16, 64), (16,)]
        qr, kr = apply_rope(q, k, cos, sin)
    assert len(saved) == 2
    (y.float().sum() + qr.float().sum() + kr.float().sum()).backward()
    assert w.grad is not None and q.grad is not None and k.grad is not None
