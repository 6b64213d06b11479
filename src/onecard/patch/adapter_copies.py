"""The adapters' compute-dtype copies, made once per training forward instead of at every use.

peft keeps LoRA and DoRA adapters in fp32 on a bf16 model, and onecard's fused ops compute in the input's dtype
(kernels/lora_linear.py), so each fused projection cast its A and B itself -- with checkpointing twice per step
(forward and recompute), and autograd cast each gradient back: about 2,000 small kernels and 700 autograd nodes
per step on Qwen 2.5 14B. That is host time, and host time is what sets the speed once the GPU's work per step is
small (an FP8 base at micro-batch 2: docs/kernels.md). Here a forward pre-hook on the CausalLM casts every fused
projection's A and B in one multi-tensor copy (``torch._foreach_copy_``) under one autograd node, whose backward
copies their gradients back to fp32 the same way; ``projection_parts`` (patch/modules.py) reads the copies. A
power-of-two LoRA scale (alpha = 2 x rank, the default) goes into A's copy, so the fused ops' per-product scaling
(a launch per product, forward, recompute and backward) drops out, and A's gradient is scaled once here instead.
The arithmetic is the same casts, and multiplications by a power of two are exact, so results are bit-identical
(tests/test_adapter_copies.py).

The trap this avoids: a copy read after the weights it was made from have changed. Copies are made only by a
forward with grad enabled in training mode and read only while grad is enabled: that forward, and its checkpoint
recompute in the same step's backward, both before the optimizer steps. A no-grad forward (evaluation, a DPO or
KTO reference pass with the adapter disabled, generation) neither makes nor reads them; an eval-mode forward with
grad drops them. A copy also records the adapter name, the parameters it was made from and their version counters,
so a projection whose active adapter or parameters have changed since (replaced, loaded, stepped by a torch
optimizer) casts per use, as it would without this.
"""

from __future__ import annotations

import math

import torch

COPIES_ATTR = "_onecard_adapter_copies"


class AdapterCopy:
    """A's and B's copies for one projection, with what they were made from. Not copied by ``copy.deepcopy``
    (a reference model copied from the policy gets none: it makes its own when it trains)."""

    __slots__ = ("name", "a_source", "b_source", "versions", "scale", "folded", "a", "b")

    def __init__(self, name, a_source, b_source, scale: float, folded: bool, a, b):
        self.name, self.a_source, self.b_source, self.a, self.b = name, a_source, b_source, a, b
        self.versions = (a_source._version, b_source._version)
        self.scale, self.folded = scale, folded

    def __deepcopy__(self, memo):
        return None

    def lookup(self, name, a_source, b_source, scale: float, dtype):
        """(A, B, the scale left to apply) if the copies stand for these parameters and scale in ``dtype`` and grad
        is enabled, else None."""
        if (name == self.name and a_source is self.a_source and b_source is self.b_source and scale == self.scale
                and self.versions == (a_source._version, b_source._version)
                and self.a.dtype == dtype and torch.is_grad_enabled()):
            return self.a, self.b, 1.0 if self.folded else scale
        return None


def exact_to_fold(scale: float) -> bool:
    """A LoRA scale that can go into A's copy without changing a bit: a power of two other than 1 (the default,
    alpha = 2 x rank, is 2). Multiplying by it is exact in bf16 and fp32, so s (x A^T) = x (s A)^T to the last bit;
    any other scale would round differently and stays with the fused ops, applied to the products."""
    mantissa, _ = math.frexp(scale)
    return scale > 0 and scale != 1.0 and mantissa == 0.5


class CastCopies(torch.autograd.Function):
    """Tensors cast to ``dtype`` as one multi-tensor copy, those with a factor in ``factors`` then multiplied by
    it (LoRA scales folded into A: :func:`exact_to_fold`); backward takes their gradients back the same way: cast to
    the sources' dtype and times the same factors (the per-tensor ``.to`` and ``mul`` autograd would run, with one
    node for all)."""

    @staticmethod
    def forward(ctx, dtype, factors, *sources):
        ctx.set_materialize_grads(False)  # an adapter the step did not use gets no gradient, not a zero one
        ctx.source_dtypes, ctx.factors = [s.dtype for s in sources], factors
        copies = [torch.empty(s.shape, dtype=dtype, device=s.device) for s in sources]
        torch._foreach_copy_(copies, list(sources))
        _scale_each(copies, factors)
        return tuple(copies)

    @staticmethod
    def backward(ctx, *grads):
        live = [i for i, g in enumerate(grads) if g is not None]
        out = [None] * len(grads)
        if live:
            back = [torch.empty(grads[i].shape, dtype=ctx.source_dtypes[i], device=grads[i].device) for i in live]
            torch._foreach_copy_(back, [grads[i] for i in live])
            _scale_each(back, [ctx.factors[i] for i in live])
            for i, g in zip(live, back):
                out[i] = g
        return (None, None, *out)


def _scale_each(tensors, factors) -> None:
    """tensors[i] *= factors[i] in place, one multi-tensor op for those whose factor is not 1."""
    scaled = [(t, f) for t, f in zip(tensors, factors) if f != 1.0]
    if scaled:
        torch._foreach_mul_([t for t, _ in scaled], [f for _, f in scaled])


def adapter_refusal(proj) -> str | None:
    """Why onecard's fused ops cannot run a peft LoRA layer's adapters (peft's own forward runs the projection
    then), or None when they can: one active adapter, not merged or disabled, and where the adapter is on this
    projection dropout 0 (peft's nn.Identity), no bias on B, W not transposed (fan_in_fan_out) and no LoRA variant
    but DoRA on a Linear. The one place these checks live: ``projection_parts`` (patch/modules.py) runs them per
    forward, ``make_copies`` before casting, ``apply_kernels`` once to say why."""
    if proj.disable_adapters:
        return "adapters disabled"
    if proj.merged:
        return "adapter merged into the base"
    if len(proj.active_adapters) != 1:
        return f"{len(proj.active_adapters)} active adapters"
    name = proj.active_adapters[0]
    if name not in proj.lora_A:
        return None
    dropout = proj.lora_dropout[name]
    if not isinstance(dropout, torch.nn.Identity):
        return f"LoRA dropout {float(dropout.p)}"
    if proj.lora_B[name].bias is not None:
        return "a bias on lora_B"
    if getattr(proj, "fan_in_fan_out", False):  # peft's Linear and bnb layers set it; its Embedding has none
        return "fan_in_fan_out (transposed) base weights"
    variant = proj.lora_variant.get(name)  # peft's LoRA variants: only DoRA on a Linear is modelled
    if variant is not None and type(variant).__name__ != "DoraLinearVariant":
        return f"the LoRA variant {type(variant).__name__}"
    return None


def active_adapter_weights(proj):
    """(name, A parameter, B parameter) of a peft LoRA layer's one active adapter when the fused ops run it
    (``adapter_refusal``), else None."""
    lora_a = proj.__dict__.get("_modules", {}).get("lora_A")
    if lora_a is None or adapter_refusal(proj) is not None:
        return None
    name = proj.active_adapters[0]
    if name not in lora_a:
        return None
    return name, lora_a[name].weight, proj.lora_B[name].weight


def make_copies(parents, dtype) -> int:
    """Cast the active adapters of every projection directly under ``parents`` to ``dtype`` (those not in it
    already), the LoRA scale folded into A where that is exact, and leave the copies on the projections; returns
    how many projections got them."""
    found = []
    for parent in parents:
        for proj in parent._modules.values():
            weights = active_adapter_weights(proj)
            if weights is not None and weights[1].dtype != dtype:
                found.append((proj, *weights, float(proj.scaling[weights[0]])))
    if not found:
        return 0
    folded = [exact_to_fold(scale) for *_, scale in found]
    factors = tuple(f for (*_, scale), fold in zip(found, folded) for f in (scale if fold else 1.0, 1.0))
    copies = CastCopies.apply(dtype, factors, *[t for _, _, a, b, _ in found for t in (a, b)])
    for i, ((proj, name, a, b, scale), fold) in enumerate(zip(found, folded)):
        proj.__dict__[COPIES_ATTR] = AdapterCopy(name, a, b, scale, fold, copies[2 * i], copies[2 * i + 1])
    return len(found)


def compute_weights(proj, name, a, b, scale: float, dtype):
    """(A, B, scale) of ``proj``'s adapter ``name`` in ``dtype`` for the fused ops: this forward's copies where they
    hold (the scale already in A where it was folded, then 1), else A and B cast now and the scale as it is."""
    copy = proj.__dict__.get(COPIES_ATTR)
    found = None if copy is None else copy.lookup(name, a, b, scale, dtype)
    return found if found is not None else (a.to(dtype), b.to(dtype), scale)


def install(base, parents, handle) -> None:
    """A forward pre-hook on ``base`` (the CausalLM) making the copies for ``parents``' projections each training
    forward with grad enabled, in the input embeddings' dtype (the hidden states'); undone by ``handle``."""
    parents = list(parents)

    def before_forward(module, args, kwargs):
        if not torch.is_grad_enabled():
            return  # reads none either
        if module.training:
            make_copies(parents, module.get_input_embeddings().weight.dtype)
        else:
            drop_copies(parents)  # an eval-mode forward with grad: cast per use, never the last step's copies

    hook = base.register_forward_pre_hook(before_forward, with_kwargs=True)

    def undo():
        hook.remove()
        drop_copies(parents)

    handle.add_undo(undo)


def drop_copies(parents) -> None:
    for parent in parents:
        for proj in parent._modules.values():
            proj.__dict__.pop(COPIES_ATTR, None)
