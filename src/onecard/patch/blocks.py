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
16k tokens, so onecard splits only when the checkpoints are offloaded to host memory (patch/offload.py), where it
costs host memory and a second copy per layer each way.

Why by hand: transformers offers only whole-layer checkpointing (GradientCheckpointingLayer), and torch's
selective activation checkpointing chooses ops to *save*, not where a recompute may end. The halves follow
LlamaDecoderLayer.forward of transformers 5.17 line by line (Mistral, Qwen2 and Gemma's are the same code).
:func:`split_halves` is what the offloaded checkpoint calls; :func:`mark_split_layers` sets the per-instance flag.
"""

from __future__ import annotations

import functools
import inspect

import torch

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
    hands its checkpoint function -- is the call of a layer marked by :func:`mark_split_layers`; else None
    (checkpoint it whole). Splits are counted in :data:`CALLS`, for the run's summary."""
    layer = checkpointed_layer(function)
    if layer is None or not getattr(layer, SPLIT_FLAG, False):
        return None
    CALLS["split"] += 1
    kwargs = dict(function.keywords)
    return functools.partial(attention_half, layer, **kwargs), functools.partial(mlp_half, layer)


CALLS = {"split": 0}  # checkpoints taken as two halves since import (summary.json: split_checkpoint_calls)


def checkpointed_layer(function):
    """The decoder layer whose plain forward ``function`` runs, in either form transformers hands it:

    - ``partial(<layer>.__call__ bound as nn.Module.__call__, **kwargs)`` (transformers 5.17): the layer's module
      hooks run inside, so a layer with hooks is not recognised (the halves call its submodules, not the layer);
    - ``partial(<class forward>, <layer>, **kwargs)`` (transformers 5.24): module hooks stay outside the checkpoint.

    None for anything else, and for a layer whose instance ``forward`` was replaced (e.g. accelerate's hooks wrap
    it): the halves would skip that wrapper's work."""
    if not isinstance(function, functools.partial):
        return None
    bound = function.func
    if not function.args and isinstance(getattr(bound, "__self__", None), torch.nn.Module):
        layer = bound.__self__
        if getattr(bound, "__func__", None) is not torch.nn.Module.__call__:
            return None
        if layer._forward_hooks or layer._forward_pre_hooks:
            return None
    elif len(function.args) == 1 and isinstance(function.args[0], torch.nn.Module):
        layer = function.args[0]
        if inspect.unwrap(bound) is not inspect.unwrap(type(layer).forward):
            return None
    else:
        return None
    return None if "forward" in layer.__dict__ else layer


@functools.lru_cache(maxsize=1)
def checkpoint_form_recognised() -> bool:
    """Whether the installed transformers hands its checkpoint function in a form :func:`checkpointed_layer`
    knows: a two-line GradientCheckpointingLayer is checkpointed once with a function that only looks."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    class _Probe(GradientCheckpointingLayer):
        def forward(self, hidden_states, scale=1.0):
            return hidden_states * scale

    probe, seen = _Probe(), []
    probe.gradient_checkpointing = True
    probe._gradient_checkpointing_func = lambda fn, *args: seen.append(checkpointed_layer(fn)) or fn(*args)
    probe.train()
    with torch.enable_grad():
        probe(torch.ones(1, requires_grad=True), scale=2.0)
    return seen == [probe]


def mark_split_layers(base, decoder_class: str, handle) -> int:
    """Flag every ``decoder_class`` layer of ``base`` for splitting (revertibly); returns how many."""
    if not checkpoint_form_recognised():
        import transformers

        handle.add_notice(f"offloaded checkpoints stay whole layers: transformers {transformers.__version__} "
                           "checkpoints layers in a form onecard's half-layer split does not recognise")
        return 0
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
