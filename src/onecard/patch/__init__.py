"""Thin patching layer: put onecard's kernels into a transformers model instance, and take them out.

    handle = apply_kernels(model, kernels="onecard")   # model: HF CausalLM or a peft model around one
    ...train...
    handle.revert()

Only the instance is touched (see handle.py). Families: llama, mistral, qwen2, gemma, gemma2
(onecard.catalog.families). Anything else keeps plain transformers and ``handle.notice`` says so in one line.
``kernels="liger"`` hands the model to liger-kernel's ``_apply_liger_kernel_to_instance``.
"""

from __future__ import annotations

from onecard.catalog.families import GEGLU_ACTS, SWIGLU_ACTS, kernels_for

from .handle import PatchHandle

KERNEL_CHOICES = ("onecard", "liger", "none")


def base_causal_lm(model):
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    inner = model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def supports(model_type: str | None) -> bool:
    return kernels_for(model_type) is not None


def apply_kernels(model, kernels: str = "onecard", *, rope: bool = True, fused_loss: bool = True) -> PatchHandle:
    """Patch ``model``'s modules in place; returns the handle whose ``revert()`` undoes it."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    base = base_causal_lm(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    handle = PatchHandle(kernels=kernels, model_type=model_type)
    if kernels == "none":
        return handle
    if kernels == "liger":
        return _apply_liger(base, handle)
    spec = kernels_for(model_type)
    if spec is None:
        return _notice(handle, f"no onecard kernels for model_type {model_type!r}: plain transformers")
    _apply_onecard(base, spec, handle, rope=rope, fused_loss=fused_loss)
    return handle


def _apply_onecard(base, spec, handle: PatchHandle, *, rope: bool, fused_loss: bool) -> None:
    from .causal_lm import causal_lm_forward
    from .modules import gemma_rms_norm_forward, make_attention_forward, make_mlp_forward, rms_norm_forward

    act = getattr(base.config, spec.act_key, None)
    mlp_fn = None
    if act in SWIGLU_ACTS or act in GEGLU_ACTS:
        mlp_fn = make_mlp_forward(gelu=act in GEGLU_ACTS, skip_in_recompute=spec.mlp_feeds_residual)
    else:
        _notice(handle, f"MLP activation {act!r} has no fused kernel: transformers' MLP kept")
    attn_fn = make_attention_forward(spec.sliding_window) if (rope and spec.attention_class) else None
    norm_fn = gemma_rms_norm_forward if spec.gemma_norm else rms_norm_forward
    fused = []  # the modules whose projections the fused ops run
    for module in base.modules():
        name = type(module).__name__
        if name in spec.norm_classes:
            handle.set_forward(module, norm_fn, "rms_norm")
        elif name == spec.mlp_class and mlp_fn is not None:
            handle.set_forward(module, mlp_fn, "mlp")
            fused.append(module)
        elif attn_fn is not None and name == spec.attention_class:
            handle.set_forward(module, attn_fn, "rope")
            fused.append(module)
    refusals = _adapter_refusals(fused)
    if refusals:
        fix = "; adapter.dropout: 0 keeps them fused" if any(r.startswith("LoRA dropout") for r in refusals) else ""
        _notice(handle, f"{', '.join(refusals)}: onecard's fused attention and MLP do not run it, so those layers run "
                        f"peft's own modules (slower){fix}")
    if fused:
        from .adapter_copies import install

        install(base, fused, handle)  # adapters cast once per training forward, not per use
    if mlp_fn is not None and spec.mlp_feeds_residual:
        from .recompute import mark_recompute

        mark_recompute(base, handle)  # layers checkpointed before patching; onecard's own checkpointing marks itself
    if mlp_fn is not None and attn_fn is not None and spec.decoder_class:
        from .blocks import mark_split_layers

        mark_split_layers(base, spec.decoder_class, handle)  # taken up by offloaded checkpoints only (patch/offload.py)
    if fused_loss and hasattr(base, "lm_head") and hasattr(base, "model"):
        handle.set_forward(base, causal_lm_forward, "fused_linear_ce")


def _adapter_refusals(modules) -> list[str]:
    """Why the peft LoRA layers under ``modules`` cannot be fused (patch/adapter_copies.py ``adapter_refusal``), each
    reason once, sorted."""
    from .adapter_copies import adapter_refusal

    reasons = {adapter_refusal(sub) for m in modules for sub in m.modules() if hasattr(sub, "lora_A")}
    return sorted(reasons - {None})


def _apply_liger(base, handle: PatchHandle) -> PatchHandle:
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return _notice(handle, "kernels: liger asked but liger-kernel is not installed: plain transformers")
    from .liger import apply_liger_revertibly

    apply_liger_revertibly(base, handle, _apply_liger_kernel_to_instance)
    return handle


def _notice(handle: PatchHandle, line: str) -> PatchHandle:
    handle.add_notice(line)
    return handle


__all__ = ["PatchHandle", "apply_kernels", "base_causal_lm", "supports", "KERNEL_CHOICES"]
