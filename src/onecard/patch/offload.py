"""Offloaded activation checkpoints: each checkpointed decoder layer's input waits for its backward in pinned host
memory instead of on the GPU.

Under gradient checkpointing a layer keeps only its input hidden state (``tokens x hidden x dtype`` bytes) and
recomputes everything else in backward; for Llama 3 8B at 8 x 2048 tokens that is 32 layers x 128 MiB = 4 GiB of
GPU memory that is only read again in backward. Offloading moves those bytes to the host (the planner's
``activations_host`` component, plan/memory.py) at the cost of one device-to-host copy per layer in forward and one
host-to-device copy in backward.

How (maintained mechanisms, one small piece by hand):

- ``torch.utils.checkpoint`` (non-reentrant) stays the checkpointing. It saves its *inputs* through the autograd
  saved-tensor machinery (torch 2.13: ``_CheckpointFrame.save_inputs`` -> ``_make_saved_tensor``; torch <= 2.11:
  ``_NoopSaveInputs.save_for_backward``), *outside* its own recompute hook, so a
  ``torch.autograd.graph.saved_tensors_hooks`` context around the checkpoint call sees exactly the layer inputs and
  nothing saved inside the layer (that goes through checkpoint's own hook). tests/test_offload.py counts it: one
  tensor per layer, ``tokens x hidden`` each -- two for a layer onecard's kernels checkpoint per half
  (patch/blocks.py: the attention half's input and the MLP half's; tests/test_split_checkpoint.py).
- transformers' decoder layers are ``GradientCheckpointingLayer``s that call ``self._gradient_checkpointing_func``;
  :func:`enable_offloaded_checkpointing` sets that attribute to :func:`offloaded_checkpoint` on every layer
  ``gradient_checkpointing_enable`` switched on -- what transformers' own ``_set_gradient_checkpointing`` does.
- Why our own pack/unpack pair and not ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` (which is also what
  transformers 5.17's ``gradient_checkpointing_enable(offload=True)`` wraps around ``checkpoint``):
  save_on_cpu packs with a *blocking* ``copy_`` into a fresh pinned tensor on the compute stream, so the host
  waits for every layer's copy and stops queueing kernels. Here the device-to-host copy runs with
  ``non_blocking=True`` on a side stream (after waiting for the compute stream), and the host-to-device copy in
  backward is ``non_blocking`` too, from pinned memory -- the asynchronous copy Unsloth's offloaded gradient
  checkpointing does, without replacing the checkpoint function itself.
- The source tensor must not be reused before its copy has read it. ``record_stream`` would do that, but a block
  freed under it waits for the side stream's event before the allocator hands it out again, and meanwhile the
  allocator reserves new segments: with two offloaded tensors per layer (patch/blocks.py) that was 22.95 GiB
  reserved for 17.58 allocated on Llama 3 8B b8 (bench/results/h200-k9.jsonl). Instead the source is kept
  referenced here until two more tensors have been packed, or the decoder stack's forward has ended (a forward hook
  on the module holding the layers, so before the LM head and the loss), then the *compute* stream waits for its
  copy (long done by then: no stall) and the reference is dropped: the block returns to the compute stream's pool
  in stream order, reusable at once.
- Prefetch: backward unpacks the layers' inputs in the reverse of the order forward packed them, so when one is
  unpacked the copy back of the one packed before it starts on the side stream (each held tensor keeps a weak
  reference to its predecessor), overlapping that copy with this layer's recompute and backward. One extra layer
  input is on the GPU at a time (128 MiB for Llama 3 8B at 16k tokens).
- On the CPU there is nothing to offload: the tensor is kept as is (still counted, so the tests see the path).

Works for anything transformers checkpoints layer by layer: peft-wrapped models (the layers are the same module
instances), onecard's patched kernels (they replace modules inside the layer; a layer they mark is checkpointed
as two halves here) and QLoRA.
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Any

_STATS_LOCK = threading.Lock()
_STATS: dict[str, Any] = {"tensors": 0, "bytes": 0, "pinned": 0, "live_bytes": 0, "prefetched": 0, "held_on": set()}
_SIDE_STREAMS: dict[Any, Any] = {}
_LAST_PACKED: dict[Any, Any] = {}  # device -> weakref to the _Held packed last (the next one's predecessor)
_COPYING: dict[Any, Any] = {}  # device -> deque of (source tensor, event) whose device-to-host copy may still run
SOURCES_KEPT = 2  # offloaded sources kept referenced after their copy starts (see the module docstring)


def reset_stats() -> None:
    with _STATS_LOCK:
        _STATS.update(tensors=0, bytes=0, pinned=0, live_bytes=0, prefetched=0, held_on=set())


def stats() -> dict[str, Any]:
    """Counters since :func:`reset_stats`: tensors and bytes offloaded, how many pinned, the devices they were held
    on, ``live_bytes`` -- bytes held on the host right now (offloaded, not yet released by backward) -- and
    ``prefetched``, copies back started ahead of their layer's backward."""
    with _STATS_LOCK:
        return {**_STATS, "held_on": sorted(_STATS["held_on"])}


class _Held:
    """One offloaded tensor: the host copy, the device it goes back to, and the event that marks its copy done.

    Its lifetime is the saved tensor's (autograd drops it when the graph is freed), which ``live_bytes`` tracks.
    """

    __slots__ = ("device", "host", "event", "nbytes", "prev", "prefetched", "__weakref__")

    def __init__(self, device, host, event, nbytes: int) -> None:
        self.device, self.host, self.event, self.nbytes = device, host, event, nbytes
        self.prev = None  # weakref to the _Held packed just before this one on the same device
        self.prefetched = None  # (device tensor, event) once its copy back has been started early
        with _STATS_LOCK:
            _STATS["tensors"] += 1
            _STATS["bytes"] += nbytes
            _STATS["pinned"] += int(device is not None and host.is_pinned())
            _STATS["live_bytes"] += nbytes
            _STATS["held_on"].add(str(host.device))

    def __del__(self) -> None:
        with _STATS_LOCK:
            _STATS["live_bytes"] -= self.nbytes


def _side_stream(device):
    import torch

    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


def _pack(tensor):
    import torch

    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:  # torch <= 2.11 saves a 0-element dummy beside the inputs
        return tensor
    if tensor.device.type != "cuda":  # already in host memory: nothing to copy
        return _Held(None, tensor, None, nbytes)
    compute, side = torch.cuda.current_stream(tensor.device), _side_stream(tensor.device)
    side.wait_stream(compute)  # the producer of ``tensor`` has run before we read it
    with torch.cuda.stream(side):
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        event = side.record_event()
    _COPYING.setdefault(tensor.device, collections.deque()).append((tensor, event))
    _release_copied(tensor.device, keep=SOURCES_KEPT)
    held = _Held(tensor.device, host, event, nbytes)
    held.prev = _LAST_PACKED.get(tensor.device)
    _LAST_PACKED[tensor.device] = weakref.ref(held)
    return held


def release_copied(*_hook_args) -> None:
    """Release every offloaded source whose copy has been queued (all devices); a forward hook's signature."""
    for device in list(_COPYING):
        _release_copied(device, keep=0)


def _release_copied(device, keep: int) -> None:
    """Drop the references to offloaded sources but the newest ``keep``, once the compute stream waits for their
    device-to-host copies: their memory is then free in the compute stream's order."""
    import torch

    copying = _COPYING.get(device)
    while copying and len(copying) > keep:
        _, event = copying.popleft()
        torch.cuda.current_stream(device).wait_event(event)


def _copy_back(held, stream):
    """Start ``held``'s host-to-device copy on ``stream``; returns (device tensor, event marking it done).

    The device tensor is allocated on the *compute* stream either way: a block allocated on the side stream
    would sit in that stream's pool of the caching allocator, and the compute stream could not reuse it after
    it is freed (measured: 21.76 GiB reserved for 18.27 allocated on Llama 3 8B b8, against ~1.3 GiB of slack
    without prefetch). The side stream first waits for the compute work queued so far, which may still be
    using the block's previous contents."""
    import torch

    compute = torch.cuda.current_stream(held.device)
    tensor = torch.empty(held.host.shape, dtype=held.host.dtype, device=held.device)
    if stream is not compute:
        stream.wait_stream(compute)
    with torch.cuda.stream(stream):
        stream.wait_event(held.event)  # its device-to-host copy has finished
        tensor.copy_(held.host, non_blocking=True)
        return tensor, stream.record_event()


def _unpack(held):
    import torch

    if not isinstance(held, _Held):
        return held
    if held.device is None:
        return held.host
    _release_copied(held.device, keep=0)  # backward has started: forward's last sources are not needed
    compute = torch.cuda.current_stream(held.device)
    if held.prefetched is None:
        tensor, event = _copy_back(held, compute)
    else:
        tensor, event = held.prefetched
        held.prefetched = None
        compute.wait_event(event)
    prev = held.prev() if held.prev is not None else None
    if prev is not None and prev.prefetched is None and prev.device == held.device:
        prev.prefetched = _copy_back(prev, _side_stream(held.device))
        with _STATS_LOCK:
            _STATS["prefetched"] += 1
    return tensor


def offloaded_checkpoint(function, *args, **kwargs):
    """``torch.utils.checkpoint.checkpoint`` (non-reentrant) whose saved inputs wait in pinned host memory.

    A layer marked by onecard's kernels (patch/blocks.py) is checkpointed as two halves, attention and MLP, each
    with its input offloaded: twice the host bytes, and a recompute that skips the o projection."""
    from onecard.patch.blocks import split_halves
    from onecard.patch.recompute import attention_recompute_contexts, recompute_contexts

    kwargs["use_reentrant"] = False  # reentrant checkpoint saves no inputs through hooks: nothing would offload
    halves = split_halves(function) if len(args) == 1 and "context_fn" not in kwargs else None
    if halves is None:
        kwargs.setdefault("context_fn", recompute_contexts)  # patched MLPs skip work the recompute does not need
        return _checkpoint_offloaded(function, *args, **kwargs)
    attention, mlp = halves
    mid = _checkpoint_offloaded(attention, *args, context_fn=attention_recompute_contexts, **kwargs)
    return _checkpoint_offloaded(mlp, mid, context_fn=recompute_contexts, **kwargs)


def _checkpoint_offloaded(function, *args, **kwargs):
    import torch
    from torch.utils.checkpoint import checkpoint

    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        return checkpoint(function, *args, **kwargs)


offloaded_checkpoint.onecard_marks_recompute = True  # passes recompute_contexts itself (patch/recompute.py)


def enable_offloaded_checkpointing(model) -> int:
    """Point every checkpointed transformers layer of ``model`` at :func:`offloaded_checkpoint`; returns how many.

    Call after ``model.gradient_checkpointing_enable(...)``. Raises if no layer is checkpointed: offloading would
    otherwise silently do nothing.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    n, stacks = 0, {}
    for module in model.modules():
        for child in module.children():
            if isinstance(child, GradientCheckpointingLayer) and child.gradient_checkpointing:
                child._gradient_checkpointing_func = offloaded_checkpoint
                stacks[id(module)] = module
                n += 1
    for layer_list in stacks.values():  # the ModuleList of layers never runs forward itself: hook its parent
        for parent in model.modules():
            if layer_list in parent.children() and not getattr(parent, "_onecard_releases_offloaded", False):
                parent.register_forward_hook(release_copied)
                parent._onecard_releases_offloaded = True
    if n == 0:
        raise RuntimeError(f"{type(model).__name__} has no checkpointed GradientCheckpointingLayer: "
                           "offloaded activation checkpoints need transformers' layer-wise checkpointing")
    return n
