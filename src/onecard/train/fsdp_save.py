"""Saving what an FSDP-trained model learned through the libraries' own ``save_pretrained``.

Under FSDP2 each rank holds a shard (a DTensor) of every parameter. :func:`gathered_trainable` collects the full
*trainable* tensors on rank 0's host with torch's ``get_model_state_dict`` -- not accelerate's
``Accelerator.get_state_dict``, which gathers the frozen base too (35 GiB of NF4 for a 70B QLoRA, for an adapter of
a few hundred MiB). ``fully_shard`` changes each module's class in place and adds no wrapper module, so the names
are the plain model's and peft's ``save_pretrained(state_dict=...)`` finds its adapter keys as on one GPU. (Under
FSDP1 the wrapper's ``_fsdp_wrapped_module.`` in the middle of the names made peft 0.21 write an adapter with no
tensors, seen on 2 x H200, notes/multigpu.md; tests/test_fsdp_save.py checks the FSDP2 file key for key.)
"""

from __future__ import annotations


def gathered_trainable(model) -> dict:
    """The full trainable tensors, on rank 0's CPU (empty elsewhere); every rank must call it (all-gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def save_gathered(model, path, state_dict, **kwargs) -> None:
    """``model.save_pretrained(path, state_dict=...)``: the gathered tensors, never the local shards."""
    model.save_pretrained(path, state_dict=state_dict, **kwargs)
