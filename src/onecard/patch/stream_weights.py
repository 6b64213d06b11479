"""Stream the frozen base weights of the decoder layers from pinned host memory (``training.offload_weights``).

Every streamed layer's frozen tensors (bf16 matrices for LoRA; for QLoRA the bitsandbytes NF4 ``Params4bit``
data and its ``quant_state.absmax``) are packed into one pinned host buffer per layer. A small fixed ring of
``slots`` GPU buffers, each the size of one layer, is allocated once; the ``k``-th streamed layer always lands in
slot ``k % slots``.

Which layers stream (:func:`streamed_layer_ids`): spread evenly between the resident ones, not a block at the end.
A layer's copy takes longer than its forward whenever the host link is slower than the GPU's pass over it (14B bf16
at 4k tokens per micro-batch on the H200: ~10 ms of copy against ~3 ms of forward), so a block of streamed layers
runs at the copy's pace through the whole block, while the resident layers before it leave the copy stream idle
(only ``slots - 1`` layers can be fetched ahead). Interleaved, each copy overlaps the compute of the resident
layers before it, and the forward costs about max(compute, copies) instead of compute plus the copies' excess. Before a layer runs, its parameters' ``.data`` (and quant-state attributes) are pointed
at views into its slot; when it is done they are pointed back at the host views, so ``state_dict``, saving and
export read the true values wherever they run. The copy of the next ``prefetch`` layers runs on a side stream.

When a layer is in use, and what a slot must not be overwritten before:
- forward (training: inside a non-reentrant checkpoint; eval: under no_grad): bound at the first submodule call
  (``self_attn`` or ``mlp`` pre-hook), released after the MLP. Training without checkpointing is refused: autograd
  would keep every layer's weights until backward.
- backward: the checkpoint's recompute binds the layer again (the recompute calls the same submodules, also for
  the split halves of patch/blocks.py); the slot is released when the gradient of the layer's *input* is complete
  (a tensor hook registered in the first forward), or at the end of backward (engine callback) for a first layer
  whose input needs no gradient. What autograd keeps meanwhile: the recompute's saved tensors are detached views of
  the slot storage (torch.utils.checkpoint), onecard's fused ops keep every W by reference on ctx
  (kernels/lora_linear.py ``keep_for_backward``) and read ``.data``/``quant_state`` in backward, bitsandbytes'
  MatMul4Bit keeps a view made in the *first* forward on ctx. All three read the right bytes because the layer is
  bound again, to the same slot, whenever its backward runs.
- copies into a slot wait on the event recorded when its previous layer was released; compute waits on the copy's
  event. With forward ascending and backward descending, the last ``slots`` layers of a forward are still in
  their slots when backward starts (and the first ones when the next micro-batch starts): no copy for them.

Why onecard has its own rather than accelerate's ``cpu_offload``/``AlignDevicesHook``: those hooks copy each
module's weights synchronously in ``pre_forward`` (``set_module_tensor_to_device``, non_blocking off), allocate new
device tensors every call and put meta tensors back in ``post_forward``: no prefetch, no overlap with compute, an
allocation per layer and step, and new Parameter objects each call, so a checkpointed layer's backward (which uses
the first forward's ctx, holding the old objects) would read meta tensors. Measured on the H200 (bench/
accelerate_offload_gpu.py, Llama 3 8B, 21 of 32 layers on the CPU): peft applied after ``dispatch_model`` fails in
the first backward (a gradient for a meta parameter); peft applied first trains at 750 tokens/s (onecard streams
the same shape at 4,792) and none of the offloaded layers' 294 adapter tensors gets a gradient -- the hooks hand
each forward temporary copies, so that run silently trains only the resident layers. DeepSpeed's ZeRO-3 parameter
offload (bench/deepspeed_offload_gpu.py, same shape, every layer offloaded, one process) trains every adapter tensor
but at 420 tokens/s for LoRA (253 for QLoRA on bf16-stored NF4) at 21.4 GiB reserved: it gathers each parameter
through its partitioning machinery for data-parallel ranks, and needs its engine to own the optimizer and the
training loop -- a 10x slower engine and a second trainer for what one card needs.

On the CPU there is no host/device split: the "slots" are separate CPU buffers, copies are synchronous and
streams/events are skipped, so the binding, prefetch order and slot reuse run exactly as on CUDA (tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from onecard.kernels.lora_linear import is_quantized

ALIGN_BYTES = 256


@dataclass
class _Ref:
    """One streamed tensor: ``param.data`` (owner a Parameter, name None) or ``owner.<name>`` (a quant state)."""

    owner: object
    name: str | None
    host: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        return self.owner.data if self.name is None else getattr(self.owner, self.name)

    def set(self, tensor: torch.Tensor) -> None:
        if self.name is None:
            self.owner.data = tensor
        else:
            setattr(self.owner, self.name, tensor)


@dataclass
class _Slot:
    flat: torch.Tensor
    layer: int | None = None      # whose bytes the slot holds (or is receiving)
    held: bool = False            # bound to its layer's parameters right now
    ready: object = None          # CUDA event: copy done
    free: object = None           # CUDA event: last reader done


@dataclass
class StreamStats:
    copies: int = 0          # layer copies issued
    prefetched: int = 0      # of which ahead of use
    on_demand: int = 0       # copies issued at the moment of use (compute waited)
    hits: int = 0            # uses that found the layer already in its slot
    bytes_copied: int = 0
    binds: int = 0


def frozen_refs(layer, before_adapters: bool = False) -> list[_Ref]:
    """The streamed tensors of one decoder layer, in a fixed order: frozen matrices (ndim >= 2) and, for NF4
    weights, their quant state's absmax. Norm scales, biases and the tiny quant-state tables stay resident.
    ``before_adapters``: a freshly built layer, not frozen yet (peft freezes the base later): every matrix."""
    refs = []
    for _, p in layer.named_parameters():
        if (p.requires_grad and not before_adapters) or p.ndim < 2:
            continue
        refs.append(_Ref(p, None))
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            refs.append(_Ref(qs, "absmax"))
    return refs


def _layout(refs) -> list[tuple[int, torch.dtype, torch.Size]]:
    """(byte offset, dtype, shape) of each tensor inside a layer's flat buffer, 256-byte aligned."""
    out, offset = [], 0
    for r in refs:
        t = r.get()
        out.append((offset, t.dtype, t.shape))
        offset += -(-t.numel() * t.element_size() // ALIGN_BYTES) * ALIGN_BYTES
    return out


def _views(flat, layout):
    return [flat[o:o + _nbytes(d, s)].view(d).view(s) for o, d, s in layout]


def _nbytes(dtype, shape) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def _layer_bytes(layout) -> int:
    o, d, s = layout[-1]
    return -(-(o + _nbytes(d, s)) // ALIGN_BYTES) * ALIGN_BYTES


@dataclass
class WeightStream:
    """The streaming state of one model: hooks, host buffers, slots. Build with :func:`apply_weight_streaming`."""

    device: torch.device
    layers: list
    streamed: list[int]      # streamed layer ids, ascending (:func:`streamed_layer_ids`); the rest are resident
    prefetch: int
    refs: dict[int, list[_Ref]] = field(default_factory=dict)
    slots: list[_Slot] = field(default_factory=list)
    layer_bytes: int = 0
    host_bytes: int = 0
    stats: StreamStats = field(default_factory=StreamStats)
    _hooks: list = field(default_factory=list, repr=False)
    _host_flat: dict = field(default_factory=dict, repr=False)   # layer index -> its pinned host buffer
    _slot_views: dict = field(default_factory=dict, repr=False)  # id(slot) -> the layer layout's views into it
    _copy_stream: object = None
    _end_queued: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    _order: dict = field(default_factory=dict, repr=False)       # layer id -> its position in ``streamed``

    def __post_init__(self):
        self._order = {layer: k for k, layer in enumerate(self.streamed)}

    @property
    def resident(self) -> int:
        return len(self.layers) - len(self.streamed)

    def is_streamed(self, i: int) -> bool:
        return i in self._order

    def slot_of(self, i: int) -> _Slot:
        return self.slots[self._order[i] % len(self.slots)]

    # ------------------------------------------------------------------ copies and binding
    def _issue(self, i: int, ahead: bool) -> None:
        slot = self.slot_of(i)
        if self.cuda:
            with torch.cuda.stream(self._copy_stream):
                if slot.free is not None:
                    self._copy_stream.wait_event(slot.free)
                slot.flat.copy_(self._host_flat[i], non_blocking=True)
                slot.ready = torch.cuda.Event()
                slot.ready.record(self._copy_stream)
        else:
            slot.flat.copy_(self._host_flat[i])
        slot.layer = i
        self.stats.copies += 1
        self.stats.bytes_copied += self.layer_bytes
        if ahead:
            self.stats.prefetched += 1
        else:
            self.stats.on_demand += 1

    def acquire(self, i: int) -> None:
        """Make layer ``i``'s weights usable on the compute stream (idempotent while it is bound)."""
        if not self.is_streamed(i):
            return
        slot = self.slot_of(i)
        if slot.held and slot.layer == i:
            return
        if slot.held:
            raise RuntimeError(f"weight streaming: layer {i} needs slot {self._order[i] % len(self.slots)}, "
                               f"still in use by layer {slot.layer}: more slots needed (apply_weight_streaming slots=)")
        if slot.layer == i:
            self.stats.hits += 1
        else:
            self._issue(i, ahead=False)
        if self.cuda and slot.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        for ref, view in zip(self.refs[i], self._slot_views[id(slot)]):
            ref.set(view)
        slot.held = True
        self.stats.binds += 1
        self._prefetch_after(i)

    def release(self, i: int) -> None:
        """Layer ``i`` is done with its weights for now: point them back at the host copy; the slot may be reused
        once the compute stream has passed this point."""
        if not self.is_streamed(i):
            return
        slot = self.slot_of(i)
        if not (slot.held and slot.layer == i):
            return
        for ref in self.refs[i]:
            ref.set(ref.host)
        if self.cuda:
            slot.free = torch.cuda.Event()
            slot.free.record(torch.cuda.current_stream(self.device))
        slot.held = False

    def release_all(self) -> None:
        for slot in self.slots:
            if slot.held:
                self.release(slot.layer)
        self._end_queued = False

    def _upcoming(self, i: int) -> list[int]:
        """The next ``prefetch`` streamed layers after ``i`` in the schedule: ascending in forward, descending in
        backward; an eval forward wraps around to the first streamed layer (the next forward)."""
        k, order = self._order[i], self.streamed
        if in_backward():
            return order[max(0, k - self.prefetch):k][::-1]
        out = order[k + 1:k + 1 + self.prefetch]
        if not torch.is_grad_enabled():
            out += [j for j in order[:self.prefetch - len(out)] if j != i]
        return out

    def _prefetch_after(self, i: int) -> None:
        for j in self._upcoming(i):
            slot = self.slot_of(j)
            if slot.layer == j or slot.held:
                continue
            self._issue(j, ahead=True)

    # ------------------------------------------------------------------ hooks
    def _on_submodule(self, i: int):
        def pre_hook(module, args):
            layer = self.layers[i]
            if torch.is_grad_enabled() and layer.training and not in_backward() and not getattr(
                    layer, "gradient_checkpointing", False) and any(p.requires_grad for p in layer.parameters()):
                raise RuntimeError("weight streaming needs gradient checkpointing while training (autograd would "
                                   "keep every layer's weights until backward): set training.grad_ckpt: true")
            self.acquire(i)
            if in_backward() and not self._end_queued:
                torch.autograd.Variable._execution_engine.queue_callback(self.release_all)
                self._end_queued = True
        return pre_hook

    def _on_input(self, i: int):
        def pre_hook(module, args):
            x = args[0] if args else None
            if (isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()
                    and not in_backward() and self.is_streamed(i)):
                x.register_hook(release_when_done)

        def release_when_done(grad):  # the gradient of the layer's input is complete: its backward is over
            self.release(i)
        return pre_hook

    def _after_mlp(self, i: int):
        def hook(module, args, output):
            if not in_backward():
                self.release(i)
        return hook

    def revert(self, device=None) -> None:
        """Remove the hooks and put every streamed tensor back on ``device`` (default: the GPU it streams to;
        pass "cpu" for a model that does not fit there). Frees the slots and host buffers."""
        target = self.device if device is None else torch.device(device)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.release_all()
        for i in self.streamed:
            for ref in self.refs[i]:
                ref.set(ref.host.to(target).clone() if target.type == "cpu" else ref.host.to(target))
                ref.host = None
            self.layers[i].__dict__.pop(PARKED, None)
        self.slots.clear()
        self._slot_views = {}
        self._host_flat = {}


PARKED = "_onecard_parked_weights"


def pack_to_host(layer, pin: bool, before_adapters: bool = False):
    """Put one layer's frozen tensors into one (pinned) host buffer and point them at it: (refs, flat, layout).
    A layer a build already parked (same tensors, still views of its buffer) is taken as it is. The device copies
    are freed as their last reference goes."""
    refs = frozen_refs(layer, before_adapters)
    if not refs:
        raise ValueError("weight streaming: a decoder layer without frozen matrices (is the base trainable?)")
    layout = _layout(refs)
    flat = layer.__dict__.get(PARKED)
    if flat is not None and len(flat) == _layer_bytes(layout) and all(
            v.data_ptr() == r.get().data_ptr() for r, v in zip(refs, _views(flat, layout))):
        for r in refs:
            r.host = r.get()
        return refs, flat, layout
    flat = torch.empty(_layer_bytes(layout), dtype=torch.uint8, pin_memory=pin)
    for ref, view in zip(refs, _views(flat, layout)):
        view.copy_(ref.get())  # from the GPU, or from wherever the weights were loaded
        ref.set(view)
        ref.host = view
    layer.__dict__[PARKED] = flat
    return refs, flat, layout


def in_backward() -> bool:
    """Inside autograd's backward (a checkpoint's recompute runs there)."""
    return torch._C._current_graph_task_id() != -1


def decoder_layers(model):
    """The decoder layer list of a CausalLM (or a peft model around one)."""
    from onecard.patch import base_causal_lm

    return base_causal_lm(model).get_decoder().layers


def streamed_layer_ids(num_layers: int, resident: int) -> list[int]:
    """The layers that stream when ``resident`` of ``num_layers`` stay on the card: evenly spread, the last layer
    streamed first (module docstring: why interleaved). ``resident`` 0 streams all, ``num_layers`` none."""
    streamed = num_layers - max(0, min(int(resident), num_layers))
    if streamed == 0:
        return []
    return sorted(num_layers - 1 - (k * num_layers) // streamed for k in range(streamed))


def apply_weight_streaming(model, device, resident: int = 0, slots: int = 3, prefetch: int | None = None,
                           pin: bool | None = None) -> WeightStream:
    """Move the frozen weights of all but ``resident`` decoder layers (:func:`streamed_layer_ids`) to (pinned) host
    memory and stream them back per use; adapters and every other parameter stay where they are (moved to
    ``device`` if a build parked them). ``prefetch`` defaults to ``slots - 1`` (the most the slot ring allows
    ahead); ``slots`` >= 2."""
    device = torch.device(device)
    layers = list(decoder_layers(model))
    if slots < 2:
        raise ValueError("weight streaming needs at least 2 slots (one in use, one being filled)")
    prefetch = slots - 1 if prefetch is None else min(prefetch, slots - 1)
    ws = WeightStream(device=device, layers=layers, streamed=streamed_layer_ids(len(layers), resident),
                      prefetch=prefetch)
    pin = (device.type == "cuda") if pin is None else pin
    layout = None
    for i in ws.streamed:
        refs, flat, this = pack_to_host(layers[i], pin)
        if layout is None:
            layout = this
        elif [(d, s) for _, d, s in this] != [(d, s) for _, d, s in layout]:
            raise ValueError(f"weight streaming: decoder layer {i} has other frozen tensors than layer "
                             f"{ws.streamed[0]}; streaming needs layers of one shape")
        ws.refs[i], ws._host_flat[i] = refs, flat
        ws.host_bytes += flat.numel()
    for layer in layers:  # adapters (and anything else that trains) live on the GPU
        for p in layer.parameters():
            if p.requires_grad and p.device != device:
                p.data = p.data.to(device)
    if layout is not None:
        ws.layer_bytes = _layer_bytes(layout)
        for _ in range(slots):
            slot = _Slot(flat=torch.empty(ws.layer_bytes, dtype=torch.uint8, device=device))
            ws.slots.append(slot)
            ws._slot_views[id(slot)] = _views(slot.flat, layout)
    if ws.cuda:
        ws._copy_stream = torch.cuda.Stream(device)
        torch.cuda.empty_cache()
    for i in ws.streamed:
        layer = layers[i]
        for name in ("self_attn", "mlp"):
            ws._hooks.append(getattr(layer, name).register_forward_pre_hook(ws._on_submodule(i)))
        ws._hooks.append(layer.input_layernorm.register_forward_pre_hook(ws._on_input(i)))
        ws._hooks.append(layer.mlp.register_forward_hook(ws._after_mlp(i)))
    return ws


__all__ = ["WeightStream", "apply_weight_streaming", "streamed_layer_ids", "pack_to_host", "decoder_layers", "frozen_refs", "in_backward",
           "is_quantized"]
