"""Replacement forwards for transformers modules, bound per instance by ``apply_kernels``.

Each function has the signature of the forward it replaces (transformers 5.17) and calls the pure
ops in ``onecard.kernels``. Anything the fused op does not model (LoRA dropout > 0, LoRA variants other than
DoRA, trainable or MLP biases, 8-bit base weights, several active adapters, merged adapters, fan_in_fan_out)
takes the original forward. bitsandbytes 4-bit (QLoRA) base layers are fused: the op dequantises them per use
(kernels/lora_linear.py). Frozen attention biases (Qwen2's q/k/v) are fused. peft DoRA adapters are fused: the op
takes the magnitude vector and recomputes the weight norm each forward, as peft does (kernels/lora_linear.py).
"""

from __future__ import annotations

import sys

import torch

from onecard.kernels.lora_linear import is_quantized, lora_projections
from onecard.kernels.lora_mlp import lora_mlp
from onecard.kernels.rms_norm import fp8_rows_of, rms_norm
from onecard.kernels.rope import apply_rope

from .adapter_copies import adapter_refusal, compute_weights
from .fp8 import FP8_NORM_FLAG, Fp8Linear
from .packed import packed_attention_or
from .recompute import attention_output_unused, in_recompute


def rms_norm_forward(self, hidden_states):
    """LlamaRMSNorm / Qwen2RMSNorm / MistralRMSNorm.forward."""
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, gemma=False,
                    fp8=FP8_NORM_FLAG in self.__dict__)  # it feeds FP8 projections (patch/fp8.py)


def gemma_rms_norm_forward(self, x):
    """GemmaRMSNorm / Gemma2RMSNorm.forward: (1 + weight), output cast after the multiply."""
    return rms_norm(x, self.weight, self.eps, gemma=True, fp8=FP8_NORM_FLAG in self.__dict__)


def _plain_weight(linear, allow_bias: bool = False) -> torch.Tensor | None:
    """The weight of an nn.Linear-like base layer (dense, or bitsandbytes 4-bit), else None. A bias must be
    frozen and ``allow_bias`` set."""
    bias = getattr(linear, "bias", None)
    if bias is not None and (not allow_bias or bias.requires_grad):
        return None
    if isinstance(linear, Fp8Linear):
        return linear.fp8_weight
    w = getattr(linear, "weight", None)
    if is_quantized(w) and type(linear).__name__ == "Linear4bit":
        return w
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point or type(w) not in (torch.nn.Parameter, torch.Tensor):
        return None
    return w


def projection_parts(proj, dtype, allow_bias: bool = False):
    """(W, A, B, scale, bias, magnitude) of a projection for the fused ops, or None when it cannot be fused.

    Plain nn.Linear -> (W, None, None, 1, bias, None). peft LoRA Linear with one active vanilla or DoRA adapter,
    dropout 0, not merged, not disabled -> (W_base, A, B, scaling, bias, magnitude), A/B in the compute dtype
    (peft keeps adapters in fp32 on bf16 models): the copies the training forward made (patch/adapter_copies.py),
    else cast here; autograd casts their grads back either way. The DoRA magnitude
    (None for vanilla LoRA) stays fp32: the op applies it as m/n - 1 in fp32 first (kernels/lora_linear.py).
    """
    if type(proj) in (torch.nn.Linear, Fp8Linear):
        w = _plain_weight(proj, allow_bias)
        return None if w is None else (w, None, None, 1.0, proj.bias, None)
    base = getattr(proj, "base_layer", None)
    if base is None or not hasattr(proj, "lora_A"):
        return None
    if adapter_refusal(proj) is not None:
        return None
    name = proj.active_adapters[0]
    w = _plain_weight(base, allow_bias)
    if w is None:
        return None
    if name not in proj.lora_A:  # adapter not on this projection: frozen matmul only
        return (w, None, None, 1.0, base.bias, None)
    magnitude = _dora_magnitude(proj, name)
    a, b = proj.lora_A[name], proj.lora_B[name]
    # this forward's copies (adapter_copies.py), the scale folded into A where exact
    a_c, b_c, scale = compute_weights(proj, name, a.weight, b.weight, float(proj.scaling[name]), dtype)
    return (w, a_c, b_c, scale, base.bias, magnitude)


def _dora_magnitude(proj, name):
    """None for a vanilla adapter, the magnitude parameter for a peft DoRA one (the only variant
    ``adapter_refusal`` lets through)."""
    if proj.lora_variant.get(name) is None:
        return None
    return proj.lora_magnitude_vector[name].weight


def _fusable(parts, dtype) -> bool:
    return all(p is not None and (is_quantized(p[0]) or p[0].dtype == dtype) for p in parts)


def make_mlp_forward(gelu: bool, skip_in_recompute: bool = False):
    """A gated-MLP forward (LlamaMLP / GemmaMLP shape) using the fused LoRA-aware op when it can.

    ``skip_in_recompute``: the family's MLP output goes straight into the residual add, so a checkpoint's
    recompute may skip the down projection (kernels/lora_mlp.py, patch/recompute.py)."""

    def mlp_forward(self, x):
        parts = [projection_parts(p, x.dtype) for p in (self.gate_proj, self.up_proj, self.down_proj)]
        if not _fusable(parts, x.dtype):
            return type(self).forward(self, x)
        return lora_mlp(x, *parts, gelu=gelu, skip_output=skip_in_recompute and in_recompute(), x_fp8=fp8_rows_of(x))

    return mlp_forward


def _project(x, projs, skip_output: bool = False):
    """The projections of one input: one fused LoRA op when every one can be fused, else each module.
    ``skip_output``: nothing will read the outputs (kernels/lora_linear.py ``lora_projections``)."""
    parts = [projection_parts(p, x.dtype, allow_bias=True) for p in projs]
    if _fusable(parts, x.dtype):
        return lora_projections(x, parts, skip_output=skip_output, x_fp8=fp8_rows_of(x))
    return tuple(p(x) for p in projs)


def make_attention_forward(sliding_window: str | None):
    """LlamaAttention.forward (5.17) with the fused RoPE kernel and LoRA-aware q/k/v and o projections
    (kernels/lora_linear.py); ``sliding_window``: where to read it.

    Qwen2 and Mistral differ from Llama only by passing ``sliding_window`` to the attention function
    (``self.sliding_window`` resp. ``config.sliding_window``); Gemma's forward is Llama's.
    """

    def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                          past_key_values=None, cache=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        # The KV cache: the decoder layer passes it as ``past_key_values`` in transformers 5.17, as ``cache`` from
        # 5.24 (the old name deprecated); read either, or generation would run with the cache silently ignored.
        cache = past_key_values if cache is None else cache

        eager = sys.modules[type(self).__module__].eager_attention_forward
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        qkv = _project(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in qkv)
        cos, sin = position_embeddings
        q, k = apply_rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attn = packed_attention_or(ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager),
                                   cache)  # packed rows -> varlen (patch/packed.py)
        if sliding_window == "attr":
            kwargs["sliding_window"] = self.sliding_window
        elif sliding_window == "config":
            kwargs["sliding_window"] = getattr(self.config, "sliding_window", None)
        out, weights = attn(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                            scaling=self.scaling, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        # In an attention half's recompute (offloaded checkpoints, patch/blocks.py) nothing reads the o projection.
        return _project(out, (self.o_proj,), skip_output=attention_output_unused())[0], weights

    return attention_forward
