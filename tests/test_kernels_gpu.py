"""The compiled Triton kernels on CUDA, at real-model row widths and odd shapes (``gpu`` marker).

Tolerance: bf16 relative L2 error <= 1e-2 vs a float64 reference, no NaN; model-level: every
trainable gradient of a bf16 tiny model within 2e-2 of the unpatched bf16 model's (both are bf16
approximations of the same fp64 quantity; each is ~3e-3 from it).
"""

import _kernel_env  # noqa: F401
import pytest
import torch
from _kernel_env import assert_close_rel, rel_err

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16


def _pair(t):
    a = t.to("cuda", BF16).requires_grad_()
    return a, a.detach().double().requires_grad_()


@pytest.mark.parametrize("cols", [4096, 3584, 2305])
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_cuda(cols, gemma):
    from onecard.kernels.rms_norm import rms_norm, rms_norm_reference

    x, x64 = _pair(torch.randn(3, 171, cols) * 4)
    w, w64 = _pair(torch.randn(cols) * 0.1 + (0 if gemma else 1))
    y = rms_norm(x, w, 1e-5, gemma)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = rms_norm_reference(x64, w64, 1e-5, gemma)
    ref.backward(dy.double())
    for a, b in ((y, ref), (x.grad, x64.grad), (w.grad, w64.grad)):
        assert_close_rel(a, b, 1e-2)


@pytest.mark.parametrize("gelu", [False, True])
def test_glu_cuda(gelu):
    from onecard.kernels.glu import geglu, glu_reference, swiglu

    g, g64 = _pair(torch.randn(2, 333, 14336) * 2)
    u, u64 = _pair(torch.randn(2, 333, 14336))
    h = (geglu if gelu else swiglu)(g, u)
    dh = torch.randn_like(h)
    h.backward(dh)
    ref = glu_reference(g64, u64, gelu)
    ref.backward(dh.double())
    for a, b in ((h, ref), (g.grad, g64.grad), (u.grad, u64.grad)):
        assert_close_rel(a, b, 1e-2)


def test_rope_cuda():
    from onecard.kernels.rope import apply_rope, rope_reference

    bsz, seq, dim = 2, 301, 128
    q, q64 = _pair(torch.randn(bsz, seq, 32, dim))
    k, k64 = _pair(torch.randn(bsz, seq, 8, dim))
    inv = 1.0 / (500000 ** (torch.arange(0, dim, 2).float() / dim))
    fr = torch.arange(seq).float()[:, None] * inv
    emb = torch.cat([fr, fr], -1)[None].cuda()
    cos, sin = emb.cos().to(BF16), emb.sin().to(BF16)
    qo, ko = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    ((qo.float() ** 2).sum() + (ko.float() ** 2).sum()).backward()
    qr, kr = rope_reference(q64.transpose(1, 2), k64.transpose(1, 2), cos.double(), sin.double())
    ((qr**2).sum() + (kr**2).sum()).backward()
    for a, b in ((qo, qr), (ko, kr), (q.grad, q64.grad), (k.grad, k64.grad)):
        assert_close_rel(a, b, 1e-2)


def test_fused_ce_cuda_llama3_vocab():
    from onecard.kernels.fused_ce import fused_linear_cross_entropy, reference_linear_cross_entropy

    h, h64 = _pair(torch.randn(1000, 512))
    w, w64 = _pair(torch.randn(128256, 512) / 512**0.5)
    y = torch.randint(0, 128256, (1000,), device="cuda")
    y[:100] = -100
    loss, count = fused_linear_cross_entropy(h, w, y)
    loss.backward()
    ref, _ = reference_linear_cross_entropy(h64, w64, y)
    ref.backward()
    assert int(count) == 900 and abs(float(loss) / float(ref) - 1) < 1e-2
    assert_close_rel(h.grad, h64.grad, 1e-2)
    assert_close_rel(w.grad, w64.grad, 1e-2)


def test_patched_tiny_llama_lora_bf16_cuda():
    import transformers
    from peft import LoraConfig, get_peft_model

    from onecard.patch import apply_kernels
    from onecard.tiny import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=300, hidden_size=256, intermediate_size=688, num_attention_heads=8)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=BF16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    ids = torch.randint(0, 300, (2, 129), device="cuda")

    def step():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    l0, g0 = step()
    handle = apply_kernels(model)
    l1, g1 = step()
    handle.revert()
    assert abs(l1 - l0) <= 1e-2 * l0
    worst = max(rel_err(g1[n], g0[n]) for n in g0)
    assert worst <= 2e-2, worst
