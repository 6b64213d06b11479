"""Fused linear cross-entropy and the LoRA-aware fused MLP vs their unfused references / peft.

Tolerances: float64 1e-10 (same math, different summation order); fp32 1e-5; bf16 1e-2.
"""

import _kernel_env  # noqa: F401
import pytest
import torch
from _kernel_env import assert_close_rel

from onecard.kernels.fused_ce import fused_linear_cross_entropy, reference_linear_cross_entropy
from onecard.kernels.lora_mlp import lora_mlp, lora_mlp_reference


def _ce_case(dtype, n=37, dim=16, vocab=50, seed=0):
    torch.manual_seed(seed)
    h = torch.randn(n, dim, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, dim, dtype=dtype) / dim**0.5).requires_grad_()
    y = torch.randint(0, vocab, (n,))
    y[::3] = -100
    return h, w, y


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk", [1, 8, 64, None])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_ce_matches_reference_float64(softcap, chunk, reduction):
    h, w, y = _ce_case(torch.float64)
    loss, count = fused_linear_cross_entropy(h, w, y, chunk_size=chunk, reduction=reduction, softcap=softcap)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref, ref_count = reference_linear_cross_entropy(h, w, y, reduction=reduction, softcap=softcap)
    ref.backward()
    assert int(count) == int(ref_count) == int((y != -100).sum())
    assert abs(float(loss) - float(ref)) <= 1e-10 * abs(float(ref))
    assert_close_rel(gh, h.grad, 1e-10, "dh")
    assert_close_rel(gw, w.grad, 1e-10, "dw")


def test_fused_ce_bf16_and_upstream_scale():
    """bf16 inputs, loss scaled by 0.5 upstream (as /num_items does): grads scale too."""
    h, w, y = _ce_case(torch.bfloat16, n=64, dim=32, vocab=300)
    loss, _ = fused_linear_cross_entropy(h, w, y, chunk_size=16)
    (loss * 0.5).backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref, _ = reference_linear_cross_entropy(h64, w64, y)
    (ref * 0.5).backward()
    assert abs(float(loss) - float(ref)) <= 1e-2 * float(ref)
    assert_close_rel(h.grad, h64.grad, 1e-2, "dh")
    assert_close_rel(w.grad, w64.grad, 1e-2, "dw")


def test_fused_ce_frozen_head_and_all_ignored():
    h, w, y = _ce_case(torch.float32)
    w.requires_grad_(False)
    loss, count = fused_linear_cross_entropy(h, w, torch.full_like(y, -100), reduction="mean")
    loss.backward()
    assert int(count) == 0 and float(loss) == 0.0 and not torch.isnan(h.grad).any()
    assert w.grad is None


def test_fused_ce_never_builds_full_logits(monkeypatch):
    """Each matmul of the forward sees at most chunk_size rows: no (tokens x vocab) logits."""
    h, w, y = _ce_case(torch.float32, n=100, vocab=70)
    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        out = real(a, b)
        seen.append(out.shape)
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    fused_linear_cross_entropy(h, w, y, chunk_size=16)
    logit_shapes = [s for s in seen if s[-1] == 70]
    assert logit_shapes and all(s[0] <= 16 for s in logit_shapes)


def _proj(out_f, in_f, rank, lora=True, dtype=torch.float32):
    w = torch.randn(out_f, in_f, dtype=dtype) / in_f**0.5
    if not lora:
        return (w, None, None, 1.0)
    a = (torch.randn(rank, in_f, dtype=dtype) / in_f**0.5).requires_grad_()
    b = (torch.randn(out_f, rank, dtype=dtype) * 0.1).requires_grad_()
    return (w, a, b, 2.0)


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("up_lora", [True, False])
def test_lora_mlp_matches_autograd(gelu, up_lora):
    torch.manual_seed(0)
    hid, inter, r = 24, 40, 4
    gate, up, down = _proj(inter, hid, r), _proj(inter, hid, r, up_lora), _proj(hid, inter, r)
    x = torch.randn(2, 5, hid, requires_grad=True)
    trainable = [t for p in (gate, up, down) for t in p[1:3] if t is not None]
    y = lora_mlp(x, gate, up, down, gelu=gelu)
    dy = torch.randn_like(y)
    y.backward(dy)
    got = [x.grad.clone()] + [t.grad.clone() for t in trainable]
    x.grad = None
    for t in trainable:
        t.grad = None
    ref = lora_mlp_reference(x, gate, up, down, gelu=gelu)
    ref.backward(dy)
    assert_close_rel(y, ref, 1e-5, "y")
    for a, b in zip(got, [x.grad] + [t.grad for t in trainable]):
        assert_close_rel(a, b, 1e-5, "grad")


def test_lora_mlp_full_finetune_weights_get_grads():
    """With trainable base weights (full fine-tune) dW is computed too."""
    torch.manual_seed(0)
    ws = [torch.randn(40, 24).requires_grad_(), torch.randn(40, 24).requires_grad_(), torch.randn(24, 40).requires_grad_()]
    parts = [(w, None, None, 1.0) for w in ws]
    x = torch.randn(3, 24)
    lora_mlp(x, *parts).sum().backward()
    got = [w.grad.clone() for w in ws]
    for w in ws:
        w.grad = None
    lora_mlp_reference(x, *parts).sum().backward()
    for a, w in zip(got, ws):
        assert_close_rel(a, w.grad, 1e-5, "dW")


def test_lora_mlp_bf16():
    """bf16 error vs float64 no worse than the unfused bf16 autograd path's (+ 50%), and < 2e-2."""
    torch.manual_seed(0)
    parts = [_proj(64, 32, 8, dtype=torch.bfloat16), _proj(64, 32, 8, dtype=torch.bfloat16),
             _proj(32, 64, 8, dtype=torch.bfloat16)]
    x = torch.randn(4, 9, 32, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(4, 9, 32, dtype=torch.bfloat16)

    def grads(fn, ps, xx):
        xx = xx.detach().requires_grad_()
        ps = [tuple(t.detach().requires_grad_() if t is not None else None for t in p[:3]) + (p[3],) for p in ps]
        y = fn(xx, *ps)
        y.backward(dy.to(y.dtype))
        return [y, xx.grad, ps[0][1].grad, ps[2][2].grad]

    to64 = [tuple(t.double() if t is not None else None for t in p[:3]) + (p[3],) for p in parts]
    exact = grads(lora_mlp_reference, to64, x.double())
    fused = grads(lora_mlp, parts, x)
    plain = grads(lora_mlp_reference, parts, x)
    for f, p, e, name in zip(fused, plain, exact, ("y", "dx", "dA_gate", "dB_down")):
        err_f, err_p = _kernel_env.rel_err(f, e), _kernel_env.rel_err(p, e)
        assert not torch.isnan(f).any()
        assert err_f <= max(1.5 * err_p, 1e-3) and err_f < 2e-2, f"{name}: fused {err_f:.2e} vs unfused {err_p:.2e}"
