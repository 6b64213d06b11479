"""DoRA through onecard's fused LoRA ops: kernels vs the algebra and vs peft's own DoRA layers, and patched models.

Tolerances: float64 1e-10 against the autograd reference of the same algebra; 1e-9 against peft in float64
(peft forms the norm as W + s (B A), a different summation); bf16 2e-2 against float64; fp32 model level: loss
relative 1e-5, every trainable gradient relative L2 error 1e-4 (as tests/test_patch_families.py).
"""

import _kernel_env  # noqa: F401
import pytest
import torch
from _kernel_env import assert_close_rel, rel_err

from onecard.kernels._triton import reference_only
from onecard.kernels.lora_linear import dora_norm, lora_projections, lora_projections_reference
from onecard.kernels.lora_mlp import lora_mlp, lora_mlp_reference
from onecard.patch.modules import projection_parts

F64 = torch.float64


@pytest.fixture(autouse=True)
def _fast_cpu_kernels():
    """Numerics of the GLU/RMSNorm Triton kernels are tested elsewhere; here the torch references keep CPU fast."""
    with reference_only():
        yield


def _dora(out_f, in_f, rank, bias=False, dtype=F64, adapter=True, dora=True):
    """(W, A, B, scale, bias, magnitude), the magnitude near ||W + s B A|| (as after some training)."""
    w = torch.randn(out_f, in_f, dtype=dtype) / in_f**0.5
    c = torch.randn(out_f, dtype=dtype) if bias else None
    if not adapter:
        return (w, None, None, 1.0, c, None)
    a = (torch.randn(rank, in_f, dtype=dtype) / in_f**0.5).requires_grad_()
    b = (torch.randn(out_f, rank, dtype=dtype) * 0.1).requires_grad_()
    m = None
    if dora:
        n = torch.linalg.vector_norm(w + 2.0 * b.detach() @ a.detach(), dim=1)
        m = (n * (1 + 0.1 * torch.randn(out_f, dtype=dtype))).requires_grad_()
    return (w, a, b, 2.0, c, m)


def _fresh(parts):
    return [tuple(t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in p)
            for p in parts]


def _run(fn, x, parts, dys):
    """Outputs, then the grads of x and of every trainable tensor of ``parts`` (A, B, magnitude)."""
    x = x.detach().clone().requires_grad_()
    parts = _fresh(parts)
    outs = fn(x, parts)
    torch.autograd.backward(outs, [dy.to(o.dtype) for o, dy in zip(outs, dys)])
    return [o.detach() for o in outs], [x.grad] + [t.grad for p in parts for t in p if isinstance(t, torch.Tensor) and t.requires_grad]


def test_dora_norm_is_the_row_norm_of_the_adapted_weight():
    torch.manual_seed(0)
    w, a, b = torch.randn(10, 6, dtype=F64), torch.randn(3, 6, dtype=F64), torch.randn(10, 3, dtype=F64)
    want = torch.stack([torch.linalg.vector_norm(w[i] + 0.5 * b[i] @ a) for i in range(10)])
    w0 = w.clone()
    assert_close_rel(dora_norm(w, a, b, 0.5), want, 1e-12)
    assert torch.equal(w, w0)  # W itself is never written
    n32 = dora_norm(w.bfloat16(), a.bfloat16(), b.bfloat16(), 0.5)
    assert n32.dtype == torch.float32 and rel_err(n32, want) < 1e-2
    assert not dora_norm(w, a.requires_grad_(), b, 0.5).requires_grad


def test_dora_norm_caches_the_frozen_row_norms_and_notices_a_changed_weight():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 5, dtype=F64), requires_grad=False)
    a, b = torch.randn(2, 5, dtype=F64), torch.randn(12, 2, dtype=F64)
    first = dora_norm(w, a, b, 1.0, key=w)
    assert hasattr(w, "_onecard_row_sq")
    b2 = b * 3  # the adapter changes every step: the norm follows it, the cached ||W_i||^2 stays valid
    assert_close_rel(dora_norm(w, a, b2, 1.0, key=w), torch.linalg.vector_norm(w + b2 @ a, dim=1), 1e-12)
    with torch.no_grad():
        w.mul_(2)  # merged or reloaded in place: the cache must not answer for the old W
    assert_close_rel(dora_norm(w, a, b, 1.0, key=w), torch.linalg.vector_norm(w + b @ a, dim=1), 1e-12)
    assert not torch.allclose(first, dora_norm(w, a, b, 1.0, key=w))


def test_a_zero_magnitude_still_gets_its_gradient():
    """m = 0 scales the output to ~0; dm = sum dy z / n must still be the true gradient (y / m would be 0/0)."""
    torch.manual_seed(0)
    parts = [_dora(16, 12, 4)]
    w, a, b, s, c, m = parts[0]
    with torch.no_grad():
        m[3] = 0.0
    x, dys = torch.randn(2, 5, 12, dtype=F64), [torch.randn(2, 5, 16, dtype=F64)]
    got_y, got_g = _run(lora_projections, x, parts, dys)
    ref_y, ref_g = _run(lora_projections_reference, x, parts, dys)
    assert got_g[-1][3] != 0
    for g1, g2 in zip([*got_y, *got_g], [*ref_y, *ref_g]):
        assert_close_rel(g1, g2, 1e-10)


@pytest.mark.parametrize("bias", [False, True])
def test_projections_match_the_algebra_float64(bias):
    """DoRA q, plain k (no adapter), vanilla-LoRA v in one fused op."""
    torch.manual_seed(0)
    parts = [_dora(32, 24, 4, bias), _dora(8, 24, 4, bias, adapter=False), _dora(8, 24, 4, bias, dora=False)]
    x = torch.randn(2, 7, 24, dtype=F64)
    dys = [torch.randn(2, 7, p[0].shape[0], dtype=F64) for p in parts]
    got_y, got_g = _run(lora_projections, x, parts, dys)
    ref_y, ref_g = _run(lora_projections_reference, x, parts, dys)
    assert len(got_g) == len(ref_g) == 6  # dx, dA_q, dB_q, dm_q, dA_v, dB_v
    for a, b in zip([*got_y, *got_g], [*ref_y, *ref_g]):
        assert_close_rel(a, b, 1e-10)


def _mlp_parts(dora_down=True):
    return [_dora(40, 24, 4), _dora(40, 24, 4, dora=False), _dora(24, 40, 4, dora=dora_down)]


def _mlp(fn, skip=False):
    return lambda x, ps: (fn(x, *ps, skip_output=True) if skip else fn(x, *ps),)


@pytest.mark.parametrize("dora_down", [False, True])
def test_mlp_matches_the_algebra_float64(dora_down):
    torch.manual_seed(0)
    parts = _mlp_parts(dora_down)
    x, dy = torch.randn(2, 5, 24, dtype=F64), torch.randn(2, 5, 24, dtype=F64)
    got_y, got_g = _run(_mlp(lora_mlp), x, parts, [dy])
    ref_y, ref_g = _run(_mlp(lora_mlp_reference), x, parts, [dy])
    assert len(got_g) == 1 + 3 + 2 + 2 + dora_down
    for a, b in zip([*got_y, *got_g], [*ref_y, *ref_g]):
        assert_close_rel(a, b, 1e-10)


@pytest.mark.parametrize("dora_down", [False, True])
def test_mlp_in_a_checkpoint_skipping_its_recompute_output_gives_identical_grads(dora_down):
    """Under non-reentrant checkpointing the recompute runs with skip_output (patch/recompute.py marks it): the
    down projection's GEMM is skipped there, a DoRA one's y_d comes from the first forward (kept on ctx), and
    backward must equal the un-checkpointed op's exactly."""
    from torch.utils.checkpoint import checkpoint

    from onecard.patch.recompute import in_recompute, recompute_contexts

    torch.manual_seed(0)
    parts = _mlp_parts(dora_down)
    x, dy = torch.randn(2, 5, 24, dtype=F64), torch.randn(2, 5, 24, dtype=F64)
    skipped = []

    def layer(x, *ps):
        skipped.append(in_recompute())
        return lora_mlp(x, *ps, skip_output=in_recompute())

    def checkpointed(x, ps):
        return (checkpoint(layer, x, *ps, use_reentrant=False, context_fn=recompute_contexts),)

    _, full = _run(_mlp(lora_mlp), x, parts, [dy])
    _, ckpt = _run(checkpointed, x, parts, [dy])
    assert skipped == [False, True]
    assert len(full) == len(ckpt) and all(torch.equal(a, b) for a, b in zip(full, ckpt))


def test_bf16_close_to_float64():
    torch.manual_seed(0)
    parts64 = [_dora(64, 48, 8, bias=True), _dora(16, 48, 8)]
    parts16 = [tuple(t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and i < 5 else t for i, t in enumerate(p))
               for p in parts64]  # W, A, B, bias in bf16; the magnitude stays in its own dtype, as patching leaves it
    x = torch.randn(3, 11, 48, dtype=F64)
    dys = [torch.randn(3, 11, p[0].shape[0], dtype=F64) for p in parts64]
    y16, g16 = _run(lora_projections, x.bfloat16(), parts16, dys)
    y64, g64 = _run(lora_projections_reference, x, parts64, dys)
    assert all(t.dtype == torch.bfloat16 for t in y16)
    for a, b in zip([*y16, *g16], [*y64, *g64]):
        assert not torch.isnan(a).any() and rel_err(a, b) < 2e-2
    mlp64 = _mlp_parts()
    mlp16 = [tuple(t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and i < 5 else t for i, t in enumerate(p))
             for p in mlp64]
    x, dy = torch.randn(2, 5, 24, dtype=F64), torch.randn(2, 5, 24, dtype=F64)
    y16, g16 = _run(_mlp(lora_mlp), x.bfloat16(), mlp16, [dy])
    y64, g64 = _run(_mlp(lora_mlp_reference), x, mlp64, [dy])
    for a, b in zip([*y16, *g16], [*y64, *g64]):
        assert not torch.isnan(a).any() and rel_err(a, b) < 2e-2


def test_bf16_keeps_magnitude_changes_below_bf16_spacing():
    """m/n = 1.003 rounds to 1.0 in bf16 (spacing 2^-7 above 1): the op applies m/n - 1, so the bf16 output still
    grows by 0.3% on average, as peft's fp32 scale makes it."""
    torch.manual_seed(0)
    w, a, b = torch.randn(64, 32) / 32**0.5, torch.randn(4, 32) / 32**0.5, torch.randn(64, 4) * 0.1
    m = dora_norm(w, a, b, 2.0) * 1.003
    x = torch.randn(4096, 32)
    parts = [tuple(t.bfloat16() for t in (w, a, b)) + (2.0, None, m)]
    y = lora_projections(x.bfloat16(), parts)[0].double()
    z = (x @ w.t() + 2.0 * (x @ a.t()) @ b.t()).double()
    assert abs(float((y * z).sum() / (z * z).sum()) - 1.003) < 5e-4


def _peft_dora(bias, dtype=F64, quantized=False):
    """A peft DoRA Linear (16 -> 24, r 4) with B and the magnitude moved off their init."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 24, bias=bias)).to(dtype)
    if quantized:
        from onecard.train.layerwise import quantize_linears_

        quantize_linears_(net, "cpu", compute_dtype=dtype)
        if not getattr(net[0].weight, "bnb_quantized", True):
            net[0].weight = net[0].weight._quantize("cpu")
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True,
                                           init_lora_weights=False, lora_dropout=0.0))
    proj = model.base_model.model[0]
    with torch.no_grad():
        proj.lora_magnitude_vector["default"].weight.mul_(1 + 0.1 * torch.randn(24, dtype=dtype))
    return proj


def _against_peft(proj, dtype, tol):
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    params = [p for p in proj.parameters() if p.requires_grad]
    assert len(params) == 3  # A, B, magnitude
    dy = torch.randn(3, 5, 24, dtype=dtype)
    ref_y = proj(x)
    ref = torch.autograd.grad(ref_y, [x, *params], dy)
    parts = projection_parts(proj, dtype, allow_bias=True)
    assert parts is not None and parts[5] is proj.lora_magnitude_vector["default"].weight
    y = lora_projections(x, [parts])[0]
    got = torch.autograd.grad(y, [x, *params], dy)
    assert_close_rel(y.detach(), ref_y.detach(), tol, "y")
    for name, g, r in zip(["x", "A", "B", "magnitude"], got, ref):
        assert g.dtype == r.dtype
        assert_close_rel(g, r, tol, name)


@pytest.mark.parametrize("bias", [False, True])
def test_matches_peft_dora_linear_float64(bias):
    proj = _peft_dora(bias)
    assert type(proj.lora_variant["default"]).__name__ == "DoraLinearVariant"
    _against_peft(proj, F64, 1e-9)


def test_matches_peft_dora_on_nf4_base():
    """QLoRA + DoRA: the norm is taken of the dequantised W, as peft's dequantize_module_weight does."""
    pytest.importorskip("bitsandbytes")
    proj = _peft_dora(bias=False, dtype=torch.float32, quantized=True)
    assert type(proj.base_layer).__name__ == "Linear4bit"
    _against_peft(proj, torch.float32, 1e-5)


def test_other_lora_variants_still_fall_back():
    proj = _peft_dora(False)
    proj.lora_variant["default"] = object()
    assert projection_parts(proj, F64) is None


def _dora_model(arch):
    import transformers
    from peft import LoraConfig, get_peft_model

    from onecard.tiny import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(arch, vocab_size=300, intermediate_size=96)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                             use_dora=True))
    with torch.no_grad():
        for name, p in model.named_parameters():  # peft inits B = 0 and m = n: make both do something
            if "lora_B" in name:
                p.normal_(std=0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.05 * torch.randn_like(p))
    return model.train()


def _loss_and_grads(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (2, 19), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100
    model.zero_grad()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_patched_dora_model_matches_peft(arch, checkpointed, monkeypatch):
    """All 7 projections DoRA: the patched model gives peft's loss and every gradient (A, B, magnitude), through
    the fused ops with a magnitude on every projection -- with and without non-reentrant checkpointing."""
    from onecard.patch import apply_kernels, modules
    from onecard.patch.recompute import recompute_contexts

    dora_calls = {"mlp": 0, "projections": 0}
    real_mlp, real_proj = modules.lora_mlp, modules.lora_projections

    def counting_mlp(x, *parts, **kw):
        dora_calls["mlp"] += all(p[5] is not None for p in parts)
        return real_mlp(x, *parts, **kw)

    def counting_projections(x, parts, **kw):
        dora_calls["projections"] += all(p[5] is not None for p in parts)
        return real_proj(x, parts, **kw)

    monkeypatch.setattr(modules, "lora_mlp", counting_mlp)
    monkeypatch.setattr(modules, "lora_projections", counting_projections)
    model = _dora_model(arch)
    plain_loss, g_plain = _loss_and_grads(model)
    assert sum("lora_magnitude_vector" in n for n in g_plain) == 7 * model.config.num_hidden_layers
    if checkpointed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                           "context_fn": recompute_contexts})
        model.enable_input_require_grads()
    handle = apply_kernels(model, "onecard")
    loss, g_fused = _loss_and_grads(model)
    assert abs(loss - plain_loss) <= 1e-5 * plain_loss
    assert g_plain.keys() == g_fused.keys()
    for name in g_plain:
        assert rel_err(g_fused[name], g_plain[name]) <= 1e-4, name
    layers, passes = model.config.num_hidden_layers, 2 if checkpointed else 1  # forward (+ recompute)
    assert dora_calls == {"mlp": layers * passes, "projections": 2 * layers * passes}
    handle.revert()


@pytest.mark.gpu
def test_bf16_on_cuda_close_to_float64():
    """The DoRA MLP in bf16 on the GPU (cuBLAS, the Triton GLU) against float64 on the CPU."""
    import onecard.kernels._triton as triton_gate

    def on_cuda(t, i):  # W, A, B, bias in bf16 (i < 5); the magnitude in fp32, as patching leaves peft's
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().to("cuda", torch.bfloat16 if i < 5 else torch.float32).requires_grad_(t.requires_grad)

    torch.manual_seed(0)
    mlp64 = _mlp_parts()
    cuda16 = [tuple(on_cuda(t, i) for i, t in enumerate(p)) for p in mlp64]
    x, dy = torch.randn(2, 5, 24, dtype=F64), torch.randn(2, 5, 24, dtype=F64)
    forced, triton_gate._FORCE_REFERENCE[0] = triton_gate._FORCE_REFERENCE[0], False  # the real kernels here
    try:
        y16, g16 = _run(_mlp(lora_mlp), x.to("cuda", torch.bfloat16), cuda16, [dy.cuda()])
    finally:
        triton_gate._FORCE_REFERENCE[0] = forced
    y64, g64 = _run(_mlp(lora_mlp_reference), x, mlp64, [dy])
    assert len(g16) == len(g64) == 9
    for a, b in zip([*y16, *g16], [*y64, *g64]):
        assert not torch.isnan(a).any() and rel_err(a.cpu().double(), b) < 2e-2
