"""A pre-norm decoder layer as two halves, for checkpointing each half on its own (offloaded checkpoints).

transformers checkpoints a decoder layer whole: in backward the recompute runs norm, q/k/v, RoPE, attention,
o projection, residual add, norm and gate/up, and only then the layer's backward starts. With the two halves
checkpointed apart (input ``x`` of the attention half, input ``h = x + attn(x)`` of the MLP half):
- the MLP half's recompute is norm + gate/up from ``h`` (the down projection is skipped as before, lora_mlp);
- the attention half's recompute ends at the o projection, whose output only feeds the residual add: onecard's
  fused projection skips its GEMM there (``attention_output_unused``, kernels/lora_linear.py ``skip_output``);
- the attention half's recomputed tensors (q, k, v, attention output, normed input) are no longer alive during the
  MLP's backward.
The price is one more saved tensor per layer (``h``, tokens x hidden): on the GPU that is 4 GiB for Llama 3 8B at
16k tokens, so onecard splits only when the checkpoints are offloaded to host memory (train/offload.py), where it
costs host memory and a second copy per layer each way.

Why by hand: transformers offers only whole-layer checkpointing (GradientCheckpointingLayer), and torch's
selective activation checkpointing chooses ops to *save*, not where a recompute may end. The halves follow
LlamaDecoderLayer.forward of transformers 5.17 line by line (Mistral, Qwen2 and Gemma's are the same code).
:func:`split_halves` is what the offloaded checkpoint calls; :func:`mark_split_layers` sets the per-instance flag.
"""

from __future__ import annotations

import functools

SPLIT_FLAG = "onecard_split_halves"


def attention_half(layer, hidden_states, **kwargs):
    """``x + self_attn(input_layernorm(x))``: the first half of LlamaDecoderLayer.forward."""
    attn_out, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
    return hidden_states + attn_out


def mlp_half(layer, hidden_states):
    """``h + mlp(post_attention_layernorm(h))``: the second half."""
    return hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))


def split_halves(function):
    """(attention half, MLP half) as one-argument callables when ``function`` -- what GradientCheckpointingLayer
    hands its checkpoint function: ``partial(<layer>.__call__ bound as nn.Module.__call__, **layer kwargs)`` -- is
    the call of a layer marked by :func:`mark_split_layers`; else None (checkpoint it whole). A layer with module
    hooks is not split: the halves call its submodules, not the layer."""
    bound = getattr(function, "func", None)
    layer = getattr(bound, "__self__", None)
    if layer is None or not getattr(layer, SPLIT_FLAG, False) or getattr(function, "args", ()):
        return None
    if layer._forward_hooks or layer._forward_pre_hooks:
        return None
    kwargs = dict(function.keywords)
    return functools.partial(attention_half, layer, **kwargs), functools.partial(mlp_half, layer)


def mark_split_layers(base, decoder_class: str, handle) -> int:
    """Flag every ``decoder_class`` layer of ``base`` for splitting (revertibly); returns how many."""
    n = 0
    for module in base.modules():
        if type(module).__name__ != decoder_class:
            continue
        setattr(module, SPLIT_FLAG, True)
        handle.add_undo(functools.partial(module.__dict__.pop, SPLIT_FLAG, None))
        n += 1
    if n:
        handle.patched["split_layers"] = handle.patched.get("split_layers", 0) + n
    return n
