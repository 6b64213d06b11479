"""Attention over packed sequences (several examples in one row), keyed on position_ids resets.

A packed row holds examples back to back with position_ids restarting at 0 for each; a token may
attend only to earlier tokens *of its own example*. torch 2.11 offers two exact ways (both checked
present on the GPU machine, docs/../shared/gpu-machine.md), since flash-attn has no wheels:
  * ``torch.nn.attention.varlen.varlen_attn``: FlashAttention over cu_seqlens (CUDA only);
  * ``flex_attention`` with a document block mask (any device; fast only under torch.compile).
transformers 5.17 itself also detects position_ids resets (masking_utils.find_packed_sequence_indices)
and builds a block-diagonal mask for sdpa/eager, so packing is already correct through a plain
transformers model; these functions are the faster kernels for the same mask, plus its reference.
Layout everywhere: q (B, Hq, S, D), k/v (B, Hkv, S, D), position_ids (B, S).
"""

from __future__ import annotations

import inspect

import torch


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) example index per token: a new example starts where position_ids does not step by +1
    (transformers' rule in find_packed_sequence_indices)."""
    step = position_ids[:, 1:] - position_ids[:, :-1]
    starts = torch.cat([torch.zeros_like(position_ids[:, :1]), (step != 1).long()], dim=1)
    return starts.cumsum(-1)


def _repeat_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=1)


def packed_attention_reference(q, k, v, position_ids, scale=None):
    """sdpa with an explicit block-diagonal causal boolean mask (the definition)."""
    doc = document_ids(position_ids)
    seq = q.shape[2]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    n_rep = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep), attn_mask=mask[:, None], scale=scale
    )


def packed_flex_attention(q, k, v, position_ids, scale=None, compiled: bool = False):
    """flex_attention with a document-causal block mask; ``compiled`` wraps it in torch.compile."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = document_ids(position_ids)

    def doc_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    bsz, _, seq, _ = q.shape
    block = create_block_mask(doc_causal, bsz, None, seq, seq, device=q.device)
    fn = torch.compile(flex_attention) if compiled else flex_attention
    return fn(q, k, v, block_mask=block, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative example lengths over the flattened batch as int32, longest example)."""
    doc = document_ids(position_ids)
    doc = doc + (torch.arange(doc.shape[0], device=doc.device) * (doc.max() + 1))[:, None]
    lengths = torch.unique_consecutive(doc.flatten(), return_counts=True)[1]
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return cu, int(lengths.max())


def packed_varlen_attention(q, k, v, position_ids, scale=None, seqlens=None):
    """FlashAttention varlen over the examples (CUDA, fp16/bf16). Output layout as q.

    ``seqlens``: ``cu_seqlens(position_ids)`` computed already (it syncs with the host; a model's
    layers share one, patch/packed.py)."""
    from torch.nn.attention.varlen import varlen_attn

    bsz, hq, seq, dim = q.shape
    cu, longest = cu_seqlens(position_ids) if seqlens is None else seqlens
    params = inspect.signature(varlen_attn).parameters
    kw = {"scale": scale}
    n_rep = hq // k.shape[1]
    if n_rep > 1 and "enable_gqa" in params:
        kw["enable_gqa"] = True
    elif n_rep > 1:
        k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    if "window_size" in params:  # torch >= 2.12 spelling of causal
        kw["window_size"] = (-1, 0)
    else:
        kw["is_causal"] = True

    def flat(t):
        return t.transpose(1, 2).reshape(bsz * seq, t.shape[1], dim)

    out = varlen_attn(flat(q), flat(k), flat(v), cu, cu, longest, longest, **kw)
    return out.reshape(bsz, seq, hq, dim).transpose(1, 2)
