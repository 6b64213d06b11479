"""Tell patched modules when they run inside a checkpointed layer's *recompute*.

Under gradient checkpointing a decoder layer runs forward twice: once for real, once in backward to rebuild the
tensors its backward needs. In the second run nothing reads the layer's output, so an MLP whose output goes
straight into the residual add (Llama, Mistral, Qwen2, Gemma) can skip its down projection there
(kernels/lora_mlp.py ``skip_output``). Whether a forward is the recompute is not exposed by torch, but its
non-reentrant checkpoint takes a ``context_fn`` returning two context managers, one entered around the first
forward and one around the recompute (torch.utils.checkpoint docs, "context_fn"): the second one sets a
thread-local flag here. transformers' decoder layers call ``self._gradient_checkpointing_func``; we wrap it per
layer instance (revertibly, through the PatchHandle), the same hook patch/offload.py uses.

Offloaded checkpoints split a layer into two checkpoints, attention half and MLP half (patch/blocks.py); the
attention half's recompute then ends at the o projection, whose output nothing reads there either:
:func:`attention_recompute_contexts` marks that recompute, :func:`attention_output_unused` asks.
"""

from __future__ import annotations

import contextlib
import functools
import threading

_STATE = threading.local()


def in_recompute() -> bool:
    return getattr(_STATE, "depth", 0) > 0


def attention_output_unused() -> bool:
    """Inside the recompute of an attention half (a checkpoint ending at the attention's o projection)."""
    return getattr(_STATE, "attention_half", 0) > 0


@contextlib.contextmanager
def _recomputing(attention_half: bool = False):
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    _STATE.attention_half = getattr(_STATE, "attention_half", 0) + int(attention_half)
    try:
        yield
    finally:
        _STATE.depth -= 1
        _STATE.attention_half -= int(attention_half)


def recompute_contexts():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``."""
    return contextlib.nullcontext(), _recomputing()


def attention_recompute_contexts():
    """``context_fn`` for the checkpoint of an attention half (patch/blocks.py): its o projection is the last op."""
    return contextlib.nullcontext(), _recomputing(attention_half=True)


def _marking(checkpoint_fn):
    @functools.wraps(checkpoint_fn)
    def checkpoint_marking_recompute(function, *args, **kwargs):
        kwargs.setdefault("context_fn", recompute_contexts)
        return checkpoint_fn(function, *args, **kwargs)

    checkpoint_marking_recompute.onecard_marks_recompute = True
    return checkpoint_marking_recompute


def _needs_marking(fn) -> bool:
    """A non-reentrant checkpoint function that does not mark the recompute itself: ``partial(checkpoint,
    use_reentrant=False)`` without a ``context_fn``. onecard's own (train/model.py enable_grad_ckpt's partial,
    patch/offload.py's offloaded_checkpoint, this module's wrapper) already mark it; reentrant checkpointing has no
    ``context_fn``; a caller's own ``context_fn`` is left alone."""
    if fn is None or getattr(fn, "onecard_marks_recompute", False):
        return False
    keywords = getattr(fn, "keywords", None) or {}
    return "context_fn" not in keywords and keywords.get("use_reentrant", True) is False


def mark_recompute(base, handle) -> int:
    """Wrap every checkpointed layer's checkpoint function of ``base`` so that its recompute sets
    :func:`in_recompute`: for models checkpointed before the kernels were applied (onecard's own
    ``enable_grad_ckpt`` and offloaded checkpoint pass :func:`recompute_contexts` themselves). Reentrant
    checkpointing has no ``context_fn``: those layers are left alone. Returns how many layers were wrapped."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for module in base.modules():
        if not (isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing):
            continue
        fn = module.__dict__.get("_gradient_checkpointing_func")
        if not _needs_marking(fn):
            continue
        module._gradient_checkpointing_func = _marking(fn)
        handle.add_undo(functools.partial(setattr, module, "_gradient_checkpointing_func", fn))
        n += 1
    if n:
        handle.patched["recompute_marks"] = handle.patched.get("recompute_marks", 0) + n
    return n
