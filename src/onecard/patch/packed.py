"""Training-time dispatch of packed rows to varlen attention (FlashAttention over cu_seqlens).

A packed row (several SFT examples back to back, position_ids restarting at 0 for each) reaches the
attention with the block-diagonal causal mask transformers 5.17 built from the position_ids resets
(``masking_utils.find_packed_sequence_indices``; only when no 2-D mask and no KV cache were given).
sdpa then runs the dense S x S masked kernel: no flash/cuDNN backend takes an arbitrary mask, and the
masked-out blocks between examples cost as much as the kept ones. ``varlen_attn`` computes the same
maths over the examples only.

The switch is exact by construction: varlen runs only when the mask handed to the attention *is* the
document-causal mask of position_ids (checked elementwise), so a user's padding mask, a sliding window
that cuts an example, or any other mask keeps transformers' attention function. The check and the
cu_seqlens need one GPU->CPU sync; every layer of one forward (and a checkpoint's recompute) gets the
same position_ids and mask tensors, so the result is cached on those two objects (weakrefs, plus
their in-place version counters) and computed once per forward.

Not wrapped: generation (a KV cache), flash/flex attention implementations (no 4-D tensor mask),
dropout > 0, CPU or fp32 tensors (varlen is CUDA fp16/bf16 only). Gemma 2's attention is not
patched by onecard at all (families.py).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch

from onecard.kernels import packing

_CACHE_SIZE = 4  # forwards alive at once: the current one, plus eval / grad-accumulation neighbours


@dataclass(frozen=True)
class PackedInfo:
    """What one forward's layers share: None fields when the batch is not a provable packed batch."""

    cu_seqlens: torch.Tensor | None  # int32, on the position_ids' device
    longest_tokens: int
    packed: bool  # position_ids restart inside some row
    mask_is_document_causal: bool  # the 4-D mask equals the block-diagonal causal mask


_cache: list[tuple[weakref.ref, weakref.ref, tuple[int, int], PackedInfo]] = []
computations = 0  # how many times packed_info did the work (tests read it: once per forward)
varlen_calls = 0  # attention calls that went through varlen_attn (train's summary.json reports them)


@lru_cache(maxsize=1)
def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def tensors_supported(query: torch.Tensor) -> bool:
    """varlen_attn is FlashAttention: CUDA, fp16/bf16 only."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and varlen_available()


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """(B, S, S) bool 'may attend' from a 4-D mask: sdpa's bool mask, or eager's additive float mask."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    return allowed[:, 0]


def _compute(position_ids: torch.Tensor, mask: torch.Tensor, batch: int) -> PackedInfo:
    global computations
    computations += 1
    position_ids = position_ids.expand(batch, -1)  # transformers sometimes passes (1, S) for a batch
    doc = packing.document_ids(position_ids)
    if not bool((doc[:, -1] > 0).any()):  # a host sync, as are the two below: once per forward
        return PackedInfo(None, 0, False, False)
    seq = position_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc.device).tril()
    expected = (doc[:, :, None] == doc[:, None, :]) & causal
    if not torch.equal(_allowed(mask).expand_as(expected), expected):
        return PackedInfo(None, 0, True, False)
    cu, longest = packing.cu_seqlens(position_ids)
    return PackedInfo(cu, longest, True, True)


def _version(t: torch.Tensor) -> int:
    """The in-place version counter; inference-mode tensors have none (and cannot change outside it)."""
    return -1 if t.is_inference() else t._version


def packed_info(position_ids: torch.Tensor, mask: torch.Tensor, batch: int) -> PackedInfo:
    """The packing facts of (position_ids, mask), computed once for the pair of tensor objects."""
    key = (_version(position_ids), _version(mask))
    for pos_ref, mask_ref, versions, info in _cache:
        if pos_ref() is position_ids and mask_ref() is mask and versions == key:
            return info
    info = _compute(position_ids, mask, batch)
    _cache.insert(0, (weakref.ref(position_ids), weakref.ref(mask), key, info))
    del _cache[_CACHE_SIZE:]
    return info


def _shape_ok(query, key, mask, position_ids) -> bool:
    bsz, _, seq, _ = query.shape
    return (key.shape[2] == seq and isinstance(mask, torch.Tensor) and mask.dim() == 4
            and mask.shape[0] in (1, bsz) and mask.shape[1] == 1 and tuple(mask.shape[2:]) == (seq, seq)
            and isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2
            and position_ids.shape[1] == seq and position_ids.shape[0] in (1, bsz)
            and mask.device == position_ids.device)


def use_varlen(module, query, key, attention_mask, dropout, sliding_window, position_ids) -> PackedInfo | None:
    """The shared PackedInfo when this call may go through varlen, else None (normal path)."""
    if dropout or not getattr(module, "is_causal", True) or not tensors_supported(query):
        return None
    if not _shape_ok(query, key, attention_mask, position_ids):
        return None
    info = packed_info(position_ids, attention_mask, query.shape[0])
    if not (info.packed and info.mask_is_document_causal):
        return None
    if sliding_window is not None and info.longest_tokens > sliding_window:
        return None  # the window cuts an example (its mask differs too): windows are not passed to varlen_attn,
        # whose window_size spelling changed between torch 2.11 and 2.12 (kernels/packing.py); untested there
    return info


def packed_attention_or(attn, cache=None):
    """``attn`` (a transformers attention function) wrapped to send packed rows through varlen.

    Same signature and return as transformers' sdpa_attention_forward: (output (B, S, H, D), None).
    With a KV cache (generation) ``attn`` itself is returned untouched."""
    if cache is not None:
        return attn

    def packed_or_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        position_ids = kwargs.get("position_ids")
        sliding_window = kwargs.get("sliding_window")
        info = use_varlen(module, query, key, attention_mask, dropout, sliding_window, position_ids)
        if info is None:
            return attn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        global varlen_calls
        varlen_calls += 1
        if position_ids.shape[0] != query.shape[0]:
            position_ids = position_ids.expand(query.shape[0], -1)
        out = packing.packed_varlen_attention(query, key, value, position_ids, scale=scaling,
                                              seqlens=(info.cu_seqlens, info.longest_tokens))
        return out.transpose(1, 2), None

    return packed_or_attention
