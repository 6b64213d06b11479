"""LoRA projections sharing one input (q/k/v, o) and the MLP's recompute mode vs their autograd references.

Tolerances: float64 1e-10 (same math, different summation order); bf16 2e-2 against float64.
"""

import _kernel_env  # noqa: F401
import pytest
import torch
from _kernel_env import assert_close_rel, rel_err

from onecard.kernels.lora_linear import is_quantized, lora_projections, lora_projections_reference
from onecard.kernels.lora_mlp import lora_mlp


def _proj(out_f, in_f, rank, adapter=True, bias=False, dtype=torch.float64, frozen=True):
    w = torch.randn(out_f, in_f, dtype=dtype) / in_f**0.5
    w.requires_grad_(not frozen)
    c = torch.randn(out_f, dtype=dtype) if bias else None
    if not adapter:
        return (w, None, None, 1.0, c)
    a = (torch.randn(rank, in_f, dtype=dtype) / in_f**0.5).requires_grad_()
    b = (torch.randn(out_f, rank, dtype=dtype) * 0.1).requires_grad_()
    return (w, a, b, 2.0, c)


def _grads(fn, x, parts, dys):
    x = x.detach().requires_grad_()
    parts = [tuple(t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) and not is_quantized(t)
                   else t for t in p) for p in parts]
    outs = fn(x, parts)
    torch.autograd.backward(outs, [dy.to(o.dtype) for o, dy in zip(outs, dys)])
    trained = [t.grad for p in parts for t in p[:3] if isinstance(t, torch.Tensor) and t.requires_grad]
    return outs, [x.grad, *trained]


@pytest.mark.parametrize("bias", [False, True])
def test_qkv_like_projections_match_autograd_float64(bias):
    """q with an adapter, k without one, v with one; optional frozen biases (Qwen2)."""
    torch.manual_seed(0)
    parts = [_proj(32, 24, 4, bias=bias), _proj(8, 24, 4, adapter=False, bias=bias), _proj(8, 24, 4, bias=bias)]
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    dys = [torch.randn(2, 7, p[0].shape[0], dtype=torch.float64) for p in parts]
    got_y, got_g = _grads(lora_projections, x, parts, dys)
    ref_y, ref_g = _grads(lora_projections_reference, x, parts, dys)
    assert len(got_g) == len(ref_g) == 5  # dx, dA_q, dB_q, dA_v, dB_v
    for a, b in zip(got_y, ref_y):
        assert_close_rel(a, b, 1e-10, "y")
    for a, b in zip(got_g, ref_g):
        assert_close_rel(a, b, 1e-10, "grad")


def test_projections_with_different_ranks_and_scales_match_autograd_float64():
    """rank_pattern / alpha_pattern: each adapter's scale applied to its own columns of the shared products."""
    torch.manual_seed(0)
    q, v = _proj(32, 24, 4), _proj(8, 24, 2)
    parts = [q, (*v[:3], 0.5, v[4])]
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    dys = [torch.randn(2, 7, p[0].shape[0], dtype=torch.float64) for p in parts]
    got_y, got_g = _grads(lora_projections, x, parts, dys)
    ref_y, ref_g = _grads(lora_projections_reference, x, parts, dys)
    for a, b in zip([*got_y, *got_g], [*ref_y, *ref_g]):
        assert_close_rel(a, b, 1e-10, "output or grad")


def test_trainable_base_weight_gets_its_gradient():
    torch.manual_seed(0)
    parts = [_proj(16, 12, 4, frozen=False)]
    x = torch.randn(5, 12, dtype=torch.float64)
    dys = [torch.randn(5, 16, dtype=torch.float64)]
    _, got = _grads(lora_projections, x, parts, dys)
    _, ref = _grads(lora_projections_reference, x, parts, dys)
    assert len(got) == 4  # dx, dW, dA, dB
    for a, b in zip(got, ref):
        assert_close_rel(a, b, 1e-10, "grad")


def test_bf16_close_to_float64():
    torch.manual_seed(0)
    parts64 = [_proj(64, 48, 8, bias=True), _proj(16, 48, 8)]
    parts16 = [tuple(t.to(torch.bfloat16) if isinstance(t, torch.Tensor) else t for t in p) for p in parts64]
    x = torch.randn(3, 11, 48, dtype=torch.float64)
    dys = [torch.randn(3, 11, p[0].shape[0], dtype=torch.float64) for p in parts64]
    y16, g16 = _grads(lora_projections, x.to(torch.bfloat16), parts16, dys)
    y64, g64 = _grads(lora_projections_reference, x, parts64, dys)
    assert all(t.dtype == torch.bfloat16 for t in y16)
    for a, b in zip([*y16, *g16], [*y64, *g64]):
        assert not torch.isnan(a).any() and rel_err(a, b) < 2e-2


def test_mlp_skip_output_keeps_the_saved_tensors_and_gradients():
    """skip_output (a checkpoint's recompute) must leave backward exactly as the full forward's."""
    torch.manual_seed(0)
    gate, up, down = (_proj(40, 24, 4)[:4], _proj(40, 24, 4)[:4], _proj(24, 40, 4)[:4])
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    dy = torch.randn(2, 5, 24, dtype=torch.float64)
    grads = []
    for skip in (False, True):
        xx = x.clone().requires_grad_()
        ps = [tuple(t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.requires_grad else t for t in p)
              for p in (gate, up, down)]
        y = lora_mlp(xx, *ps, skip_output=skip)
        assert y.shape == dy.shape
        y.backward(dy)
        grads.append([xx.grad] + [t.grad for p in ps for t in p[1:3]])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_nf4_base_weights_are_dequantised_per_use():
    """QLoRA: a bitsandbytes NF4 weight goes in as the packed Params4bit and comes back dequantised in backward."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    q = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")._quantize("cpu")
    a = (torch.randn(4, 32) / 32**0.5).requires_grad_()
    b = (torch.randn(64, 4) * 0.1).requires_grad_()
    parts = [(q, a, b, 2.0)]
    x = torch.randn(3, 5, 32)
    dys = [torch.randn(3, 5, 64)]
    got_y, got = _grads(lora_projections, x, parts, dys)
    ref_y, ref = _grads(lora_projections_reference, x, parts, dys)
    assert_close_rel(got_y[0], ref_y[0], 1e-5, "y")
    for g, r in zip(got, ref):
        assert_close_rel(g, r, 1e-5, "grad")


def _saved_by(fn) -> list:
    """The tensors ``fn`` saves for backward: each one a checkpoint's hooks handle three times a step."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def _check_saves_no_weights_and_one_rank_product(fn, parts, tokens):
    saved = _saved_by(fn)
    adapters = [t for p in parts for t in p[1:3]]
    kept = adapters + [p[0] for p in parts]
    assert not any(t is k for t in saved for k in kept), "W, A or B saved: kept on ctx instead"
    rank = sum(p[1].shape[0] for p in parts)
    assert sum(1 for t in saved if tuple(t.shape) == (tokens, rank)) == 1, [tuple(t.shape) for t in saved]
    return saved


def test_fused_ops_save_one_rank_product_and_no_weights():
    """q/k/v save x and x [A_q; A_k; A_v]^T once, not a block per projection, and keep W, A and B on ctx (they
    outlive the step anyway); the MLP x, g, u and gate/up's product. Each saved tensor costs a checkpoint ~30 Python
    calls a step."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    qkv = [_proj(24, 24, 4)[:4], _proj(8, 24, 4)[:4], _proj(8, 24, 4)[:4]]
    saved = _check_saves_no_weights_and_one_rank_product(lambda: lora_projections(x, qkv), qkv, 10)
    assert len(saved) == 2
    gate, up, down = _proj(40, 24, 4)[:4], _proj(40, 24, 4)[:4], _proj(24, 40, 4)[:4]
    saved = _check_saves_no_weights_and_one_rank_product(lambda: lora_mlp(x, gate, up, down), [gate, up], 10)
    assert len(saved) == 4
