"""Packed attention: flex (document block mask) vs the explicit-mask reference vs separate examples.

Tolerance fp32 1e-5 relative. The GPU test checks varlen_attn (FlashAttention) in bf16 at 1e-2.
"""

import _kernel_env  # noqa: F401
import pytest
import torch
from _kernel_env import assert_close_rel

from onecard.kernels.packing import (
    cu_seqlens,
    document_ids,
    packed_attention_reference,
    packed_flex_attention,
    packed_varlen_attention,
)

LENGTHS = [[5, 9, 3], [17]]  # two packed rows of 17 tokens


def _inputs(device="cpu", dtype=torch.float32, hq=4, hkv=2, dim=16):
    torch.manual_seed(0)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS]).to(device)
    q = torch.randn(2, hq, 17, dim, device=device, dtype=dtype)
    k = torch.randn(2, hkv, 17, dim, device=device, dtype=dtype)
    v = torch.randn(2, hkv, 17, dim, device=device, dtype=dtype)
    return q, k, v, pos


def test_document_ids_and_cu_seqlens():
    _, _, _, pos = _inputs()
    assert document_ids(pos)[0].tolist() == [0] * 5 + [1] * 9 + [2] * 3
    cu, longest = cu_seqlens(pos)
    assert cu.tolist() == [0, 5, 14, 17, 34] and longest == 17


def test_reference_equals_attention_over_separate_examples():
    q, k, v, pos = _inputs()
    out = packed_attention_reference(q, k, v, pos)
    start = 0
    for n in LENGTHS[0]:
        sl = slice(start, start + n)
        kk, vv = k[:1, :, sl].repeat_interleave(2, 1), v[:1, :, sl].repeat_interleave(2, 1)
        alone = torch.nn.functional.scaled_dot_product_attention(q[:1, :, sl], kk, vv, is_causal=True)
        assert_close_rel(out[:1, :, sl], alone, 1e-5, f"example at {start}")
        start += n


def test_flex_matches_reference_cpu():
    q, k, v, pos = _inputs()
    assert_close_rel(packed_flex_attention(q, k, v, pos), packed_attention_reference(q, k, v, pos), 1e-5)


@pytest.mark.gpu
def test_varlen_and_flex_match_reference_cuda():
    q, k, v, pos = _inputs("cuda", torch.bfloat16, dim=64)
    ref = packed_attention_reference(q.double(), k.double(), v.double(), pos)
    assert_close_rel(packed_varlen_attention(q, k, v, pos), ref, 1e-2, "varlen")
    assert_close_rel(packed_flex_attention(q, k, v, pos, compiled=True), ref, 1e-2, "flex")
