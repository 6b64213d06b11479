"""Planner terms for streamed base weights (``training.offload_weights``, patch/stream_weights.py). Pure Python.

Memory: the frozen matrices of the streamed decoder layers leave the card for pinned host memory; the card keeps
the first ``resident`` layers plus ``slots`` one-layer buffers. The resident count is the largest that keeps the
plan out of "tight" (plan/memory.py TIGHT_FRACTION). Host memory holds the streamed weights plus any offloaded
checkpoints; the catalog cannot know the host's RAM, so the plan assumes ``DEFAULT_HOST_RAM_GIB`` (a typical RTX
4090 box) unless the recipe's ``plan.host_ram_gib`` says otherwise, and the trainer reads the real figure.

Speed (estimated): with checkpointing a streamed layer is copied twice per micro-batch, once for its forward and
once for its recompute + backward, less the ``slots`` layers still in their slots at each forward/backward turnaround
(171 copies in 4 steps of Llama 3 8B with 24 streamed layers and 3 slots, bench/results/h200-s18.jsonl). The
streamed layers sit evenly between the resident ones (patch/stream_weights.py ``streamed_layer_ids``), so a pass's
copies overlap the compute of the whole pass, not only of the streamed layers: a pass costs max(its compute, its
copies). Per micro-batch of compute T over L layers, the forward takes F = T / 4 and the recompute + backward 3F;
with n copies of c = layer bytes / host link per pass, the step takes T + max(0, n c - F) + max(0, n c - 3F).
Left out: the copies' share of memory bandwidth and the copy stream's stalls at the slot ring's depth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from onecard.plan import static
from onecard.plan.inputs import PlanInputs
from onecard.plan.memory import GIB, TIGHT_FRACTION, MemoryPlan

DEFAULT_HOST_RAM_GIB = 64.0   # typical single-RTX-4090 workstation (2 x 32 GB DIMMs)
HOST_USABLE_FRACTION = 0.85   # the OS, the Python process and the page cache keep the rest
DEFAULT_SLOTS = 3             # patch/stream_weights.py apply_weight_streaming: 2 layers prefetched ahead


@dataclass
class StreamPlan:
    verdict: str                  # fits with streaming | does not fit even with streaming
    resident_layers: int
    streamed_layers: int
    slots: int
    layer_bytes: int              # frozen bytes of one decoder layer (one copy)
    device_bytes: int             # the plan's total on the card with streaming
    host_weight_bytes: int        # pinned: streamed weights
    host_total_bytes: int         # pinned: streamed weights + offloaded checkpoints
    host_ram_bytes: int
    host_short: bool
    copy_s_per_layer: float
    notes: list[str]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(device_gib=round(self.device_bytes / GIB, 3), host_total_gib=round(self.host_total_bytes / GIB, 3),
                 layer_gib=round(self.layer_bytes / GIB, 4), label="estimated")
        return d


def layer_stream_bytes(p: PlanInputs) -> int:
    """Bytes one decoder layer streams: its linear weights (bf16/fp32, or NF4 packed + absmax for QLoRA; the
    double-quant tables stay on the card)."""
    total = 0
    for _name, n_in, n_out in p.shape.linear_layers_per_block():
        numel = n_in * n_out
        if p.method == "qlora":
            blocks = math.ceil(numel / static.NF4_BLOCK)
            total += numel // 2 + blocks * (1 if p.double_quant else 4)
        else:
            total += numel * p.dtype_bytes
    return total


def plan_streaming(mem: MemoryPlan, host_ram_gib: float | None = None, slots: int = DEFAULT_SLOTS,
                   resident: int | None = None) -> StreamPlan:
    """Streaming for the run ``mem`` plans: the most resident layers that fit (or ``resident`` as given, e.g. by a
    bench row), and the host bytes."""
    p = mem.inputs
    layers = p.shape.num_hidden_layers
    per_layer = layer_stream_bytes(p)
    limit = (1 - TIGHT_FRACTION) * mem.capacity_bytes

    def device_with(resident: int) -> int:
        streamed = layers - resident
        return mem.total_bytes - streamed * per_layer + min(slots, streamed) * per_layer

    if resident is None:
        resident = next((r for r in range(layers, -1, -1) if device_with(r) <= limit), None)
        fits = resident is not None or device_with(0) <= mem.capacity_bytes
        resident = 0 if resident is None else resident
    else:
        resident = max(0, min(int(resident), layers))
        fits = device_with(resident) <= mem.capacity_bytes
    streamed = layers - resident
    host_w = streamed * per_layer
    host_total = host_w + mem.host_bytes
    ram = int((host_ram_gib or DEFAULT_HOST_RAM_GIB) * GIB)
    short = host_total > HOST_USABLE_FRACTION * ram
    notes = []
    if short:
        notes.append(f"pinned host memory {host_total / GIB:.1f} GiB is more than {HOST_USABLE_FRACTION:.0%} of "
                     f"{ram / GIB:.0f} GiB host RAM ({'assumed' if host_ram_gib is None else 'plan.host_ram_gib'}): "
                     "add RAM or set plan.host_ram_gib to the machine's; onecard train refuses before loading")
    copy_s = per_layer / (p.gpu.host_link_gb_s * 1e9)
    return StreamPlan("fits with streaming" if fits else "does not fit even with streaming", resident, streamed,
                      slots, per_layer, device_with(resident), host_w, host_total, ram, short, copy_s, notes)


def fits_with_streaming(mem: MemoryPlan) -> bool:
    """The run fits the card once its base weights stream, within the (assumed or given) host RAM."""
    p = mem.inputs
    if mem.fits or p.method not in ("lora", "qlora", "dora") or not p.grad_ckpt or p.num_gpus > 1:
        return mem.fits
    sp = plan_streaming(mem, host_ram_gib=p.host_ram_gib)
    return sp.verdict == "fits with streaming" and not sp.host_short


def off_card_bytes(mem: MemoryPlan, resident: int) -> int:
    """What streaming all but ``resident`` layers takes off the card: the streamed layers, less the slots they
    are copied into."""
    return int(mem.total_bytes - plan_streaming(mem, resident=resident).device_bytes)


def streamed_tokens_per_s(tokens_per_s: float, p: PlanInputs, sp: StreamPlan) -> float:
    """The step's tokens/s once the streamed layers' copies are added where they do not hide (module docstring)."""
    tokens = p.seq_len * p.micro_batch
    step_s = tokens / tokens_per_s
    passes = 4 if p.grad_ckpt else 3
    forward_s = step_s / passes
    copies_s = max(0, sp.streamed_layers - sp.slots) * sp.copy_s_per_layer  # the rest wait in their slots
    extra = max(0.0, copies_s - forward_s) + max(0.0, copies_s - (passes - 1) * forward_s)
    return tokens / (step_s + extra)


def host_ram_check(host_total_bytes: int, available_bytes: int) -> str | None:
    """The message to refuse with when the pinned bytes cannot fit the host's available RAM, else None."""
    if host_total_bytes <= HOST_USABLE_FRACTION * available_bytes:
        return None
    return (f"weight streaming needs {host_total_bytes / GIB:.1f} GiB of pinned host memory; this machine has "
            f"{available_bytes / GIB:.1f} GiB available (onecard keeps {1 - HOST_USABLE_FRACTION:.0%} free)")


def streaming_chosen(plan: MemoryPlan) -> bool:
    """Does the recipe stream: ``offload_weights: true``, or ``auto`` and the plan does not fit otherwise (one GPU,
    with every layer checkpointed: the streamed passes are the checkpointed layers')."""
    p = plan.inputs
    chosen = p.offload_weights is True or (p.offload_weights == "auto" and not plan.fits)
    # a streamed layer must be checkpointed: the trainer refuses streaming beside training.uncheckpointed_layers
    return chosen and p.num_gpus == 1 and p.grad_ckpt and not p.uncheckpointed_layers


def streaming_section(plan: MemoryPlan) -> dict | None:
    """What ``onecard plan`` shows about streaming: for ``offload_weights: true``, or ``auto`` when the plan does
    not fit otherwise; None when streaming is not chosen (the plan's output is then as without this module)."""
    p = plan.inputs
    if not streaming_chosen(plan):
        return None
    from onecard.plan.speed import estimate_throughput

    sp = plan_streaming(plan, host_ram_gib=p.host_ram_gib)
    base = estimate_throughput(p, memory_plan=plan)
    out = sp.to_dict()
    out.update(host_ram_assumed=p.host_ram_gib is None, host_activations_bytes=plan.host_bytes,
               tokens_per_s_without_copies=base.estimate_tokens_per_s,
               tokens_per_s=streamed_tokens_per_s(base.estimate_tokens_per_s, p, sp) if sp.streamed_layers else
               base.estimate_tokens_per_s)
    return out


def streams_to_fit(mem: MemoryPlan) -> StreamPlan | None:
    """The streaming the recipe will run when it streams and that makes it fit (layers really streamed), else None:
    what ``onecard plan``'s verdict, time and cost, and lint go by."""
    if not streaming_chosen(mem):
        return None
    sp = plan_streaming(mem, host_ram_gib=mem.inputs.host_ram_gib)
    return sp if sp.verdict == "fits with streaming" and sp.streamed_layers else None


def as_the_run_streams(mem: MemoryPlan, tp):
    """(memory plan, throughput) of the run as the recipe's ``training.offload_weights`` will make it: when streaming
    is chosen and makes it fit, the verdict "fits with streaming" and the streamed tokens/s, so time and cost are
    those of the run that happens rather than "does not fit"; else both unchanged."""
    from dataclasses import replace

    sp = streams_to_fit(mem)
    if sp is None:
        return mem, tp
    tokens_per_s = streamed_tokens_per_s(tp.estimate_tokens_per_s, mem.inputs, sp)
    return (replace(mem, verdict="fits with streaming"),
            replace(tp, estimate_tokens_per_s=tokens_per_s, label=f"{tp.label} + streaming"))
