"""FP8 base kernels compiled on CUDA (``gpu`` marker): the quantisers bit for bit against the torch reference at
real row widths, torch._scaled_mm GEMMs against the exact quantised algebra (bf16 output: 1e-2), the fused LoRA MLP
against the dequantised fp32 reference (5e-2), and a tiny bf16 model's LoRA gradients against its bf16 base
(cosine >= 0.99). Needs compute capability 8.9+.
"""

import _kernel_env  # noqa: F401
import pytest
import torch
from _kernel_env import assert_close_rel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an FP8 GPU")]
BF16 = torch.bfloat16


def _bits_equal(a, b):
    assert (a.view(torch.uint8) != b.view(torch.uint8)).sum().item() == 0


@pytest.mark.parametrize("cols", [4096, 14336, 2305])
def test_quantize_rows_cuda_bit_for_bit(cols):
    from onecard.kernels.fp8 import quantize_rows, quantize_rows_reference

    x = (torch.randn(257, cols, device="cuda") * 3).to(BF16)
    cs = torch.rand(cols, device="cuda") + 0.25
    for c in (None, cs):
        q, s = quantize_rows(x, c)
        qr, sr = quantize_rows_reference(x, c)
        _bits_equal(q, qr)
        assert torch.equal(s, sr)


@pytest.mark.parametrize("shape", [(4096, 14336), (28672, 4096), (1000, 2305)])
def test_transpose_bytes_cuda_bit_for_bit(shape):
    from onecard.kernels.fp8 import E4M3, transpose_bytes, transpose_bytes_reference

    q = (torch.randn(*shape, device="cuda") * 50).to(E4M3)
    _bits_equal(transpose_bytes(q), transpose_bytes_reference(q))


def test_rms_norm_and_glu_fp8_copies_cuda():
    from onecard.kernels.fp8 import quantize_rows_reference
    from onecard.kernels.glu import glu_backward, glu_backward_fp8, glu_forward, glu_forward_fp8
    from onecard.kernels.rms_norm import fp8_rows_of, rms_norm

    x = (torch.randn(2, 300, 4096, device="cuda") * 2).to(BF16)
    w = (torch.rand(4096, device="cuda") + 0.5).to(BF16)
    y = rms_norm(x, w, 1e-5, fp8=True)
    q, s = fp8_rows_of(y)
    qr, sr = quantize_rows_reference(y.reshape(-1, 4096))
    _bits_equal(q, qr)
    assert torch.equal(s, sr)
    g, u, dh = ((torch.randn(333, 14336, device="cuda") * 2).to(BF16) for _ in range(3))
    cg, cu = (torch.rand(14336, device="cuda") + 0.1 for _ in range(2))
    h, (q, s) = glu_forward_fp8(g, u)
    assert torch.equal(h, glu_forward(g, u))
    _bits_equal(q, quantize_rows_reference(h)[0])
    ref = glu_backward(dh, g, u)
    h2, dg, du, (qg, sg), (qu, su) = glu_backward_fp8(dh.clone(), g.clone(), u.clone(), cg, cu, inplace=True)
    for a, b in zip((h2, dg, du), ref):
        assert torch.equal(a, b)
    _bits_equal(qg, quantize_rows_reference(ref[1], cg)[0])
    _bits_equal(qu, quantize_rows_reference(ref[2], cu)[0])


@pytest.mark.parametrize("m,k,n", [(4096, 4096, 1024), (37, 14336, 4096), (2048, 1024, 4096)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_cublaslt_matmul_into_cuda(m, k, n, accumulate):
    """The accumulating cuBLASLt FP8 GEMM against torch._scaled_mm plus an add (bf16: one rounding fewer)."""
    from onecard.kernels.cublaslt import matmul_into
    from onecard.kernels.fp8 import Fp8Weight, quantize_rows

    w = Fp8Weight.from_dense((torch.randn(n, k, device="cuda") / k**0.5).to(BF16))
    xq, t = quantize_rows(torch.randn(m, k, device="cuda").to(BF16))
    c = torch.randn(m, n, device="cuda").to(BF16)
    want = torch._scaled_mm(xq, w.qdata.t(), scale_a=t, scale_b=w.scale.view(1, -1), out_dtype=BF16).float()
    want = want + (c.float() if accumulate else 0)
    out = c.clone()
    assert matmul_into(out, xq, t.view(-1), w.qdata, w.scale, accumulate)
    assert_close_rel(out, want, 1e-2, "out")


@pytest.mark.parametrize("tokens", [4096, 37])
def test_fp8_linear_cuda_is_the_quantised_algebra(tokens):
    from onecard.kernels.fp8 import Fp8Weight, fp8_linear, quantize_rows_reference

    x = torch.randn(tokens, 4096, device="cuda").to(BF16).requires_grad_()
    w = Fp8Weight.from_dense((torch.randn(1024, 4096, device="cuda") / 64).to(BF16))
    y = fp8_linear(x, w)
    dy = torch.randn_like(y)
    y.backward(dy)
    xq, t = quantize_rows_reference(x.detach())
    assert_close_rel(y, (xq.float() * t) @ (w.qdata.float() * w.scale[:, None]).t(), 1e-2, "y")
    dq, u = quantize_rows_reference(dy, w.scale)
    assert_close_rel(x.grad, (dq.float() * u) @ w.qdata.float(), 1e-2, "dx")


def test_fused_lora_mlp_fp8_cuda():
    from onecard.kernels.fp8 import Fp8Weight
    from onecard.kernels.lora_mlp import lora_mlp, lora_mlp_reference

    def proj(o, i):
        w = (torch.randn(o, i, device="cuda") / i**0.5).to(BF16)
        a = (torch.randn(16, i, device="cuda") / i**0.5).to(BF16).requires_grad_()
        b = (torch.randn(o, 16, device="cuda") * 0.05).to(BF16).requires_grad_()
        return Fp8Weight.from_dense(w), a, b, 2.0

    x = torch.randn(2, 512, 4096, device="cuda").to(BF16).requires_grad_()
    parts = [proj(14336, 4096), proj(14336, 4096), proj(4096, 14336)]
    y = lora_mlp(x, *parts)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [x] + [t for p in parts for t in p[1:3]]
    got = [t.grad.clone() for t in leaves]
    f32 = [(p[0].dequantize(torch.float32), *(t.detach().float().requires_grad_() for t in p[1:3]), p[3])
           for p in parts]
    x32 = x.detach().float().requires_grad_()
    ref = lora_mlp_reference(x32, *f32)
    ref.backward(dy.float())
    assert_close_rel(y, ref, 5e-2, "y")
    for a, t in zip(got, [x32] + [t for p in f32 for t in p[1:3]]):
        assert_close_rel(a, t.grad, 6e-2, "grad")


def test_tiny_bf16_model_lora_grads_fp8_vs_bf16_base():
    import transformers
    from peft import LoraConfig, get_peft_model

    from onecard.patch import apply_kernels
    from onecard.patch.fp8 import apply_fp8_base
    from onecard.tiny import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=320, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                      num_key_value_heads=2)
    base = transformers.AutoModelForCausalLM.from_config(cfg, dtype=BF16).cuda()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets)).train()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, 320, (4, 128), device="cuda")
    kh = apply_kernels(model, "onecard")

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    ref = grads()
    fh = apply_fp8_base(model)
    got = grads()
    worst = min(float(torch.nn.functional.cosine_similarity(got[n].flatten(), ref[n].flatten(), 0)) for n in ref)
    assert worst >= 0.99, worst
    fh.revert()
    kh.revert()
