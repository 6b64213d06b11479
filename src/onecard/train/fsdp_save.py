"""Saving what an FSDP-trained model learned through the libraries' own ``save_pretrained``.

Why the model is unwrapped first: peft 0.21 picks an adapter's entries out of a given state dict by module-name
prefixes taken from ``model.named_modules()`` and strips only a *leading* ``_fsdp_wrapped_module.``
(peft/tuners/tuners_utils.py ``_get_tuner_state_dict_key_prefixes``). onecard auto-wraps every decoder layer, and
peft's ``fsdp_auto_wrap_policy`` every LoRA linear, as FSDP units, so the wrapper's name sits in the middle of
those prefixes, nothing in accelerate's clean full state dict matches them, and peft writes an adapter with no
tensors -- seen on 2 x H200 (notes/multigpu.md) and reproduced on CPU in
tests/test_fsdp_save.py. Putting each unit's wrapped module back in its parent's place for the duration of
the save gives peft (and transformers) the plain model's names; the gathered tensors come from the state dict,
so the sharded parameters are never read.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def fsdp_units_unwrapped(model):
    """Within the block, every FSDP unit under ``model`` is replaced by the module it wraps; restored after."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    swaps = [(parent, name, child) for parent in list(model.modules()) if not isinstance(parent, FSDP)
             for name, child in list(parent.named_children()) if isinstance(child, FSDP)]
    try:
        for parent, name, child in swaps:
            setattr(parent, name, child.module)
        yield model
    finally:
        for parent, name, child in reversed(swaps):
            setattr(parent, name, child)


def save_gathered(model, path, state_dict, **kwargs) -> None:
    """``model.save_pretrained(path, state_dict=...)`` with the FSDP units unwrapped (see the module docstring)."""
    with fsdp_units_unwrapped(model):
        model.save_pretrained(path, state_dict=state_dict, **kwargs)
