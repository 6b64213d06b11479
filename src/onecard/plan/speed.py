"""Throughput: the physical ceiling, and an estimate under it (pure Python; no torch).

ceiling (tokens/s) = min(peak tensor FLOP/s / matmul FLOPs per token,  DRAM bandwidth / weight bytes per token).
No schedule beats it: every matmul FLOP runs on the tensor cores at best at the datasheet peak, and every weight
is read at least once per pass. (Elementwise work is left out of the ceiling on purpose: a fused kernel may hide it.)

estimate: one micro-batch takes
  max(matmul FLOPs / (peak x efficiency),  weight bytes / bandwidth,  overlappable host traffic)
  + QLoRA dequantisation bytes / bandwidth      (separate kernels: bitsandbytes writes a bf16 copy, the matmul reads it)
  + DoRA column-norm bytes / bandwidth          (reads W once per forward pass)
  + optimizer-step bytes / bandwidth / grad_accum  (full fine-tuning; negligible for adapters)
and the step is max(that device time, host dispatch time = layers x t_layer): the host enqueues kernels
asynchronously, so small micro-batches are host-bound (t_layer fitted from measured pairs, layer_overhead_s);
a step replayed from a CUDA graph (training.cuda_graph) has no dispatch term.
  + host-link traffic that cannot overlap (CPU-offloaded optimizer: grads down, params up, per optimizer step;
    paged optimizer state that did not fit)
so the estimate is at or below the ceiling by construction (efficiency <= 1, the other terms only add time).

efficiency = achieved matmul FLOP/s / peak, from the calibration profile (onecard/calibration/measurements.json),
looked up in this order, and the label says which:
  measured      the exact configuration was measured on this card: the estimate *is* the measurement;
  calibrated    same card, same method and kernels, another configuration: that row's efficiency;
  extrapolated  a measurement on another card: its efficiency moved to this card with the profile's
                memory-bound share m: e_card = e_ref / ((1 - m) + m x (bw_ref / bw_card) x (peak_card / peak_ref)),
                m per kernel class where one configuration measured on two cards fits it (bench/calibrate.py);
  estimated     no usable row: DEFAULT_EFFICIENCY, or a LoRA row's matmul efficiency for qlora/dora/full
                (their extra work is then added from bytes, as above).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from onecard.calibration import Measurement, Profile, load_profile
from onecard.catalog.gpus import GPU
from onecard.plan.flops import FlopsBreakdown, flops_for_inputs, flops_per_token, varlen_span

# Prior for a method/kernel with no measurement anywhere: about the MFU plain HF + PEFT LoRA reaches on H200
# (6,517 tokens/s x 46.6 GFLOP/token / 989.4 TFLOP/s = 0.31), rounded down.
DEFAULT_EFFICIENCY = 0.30
HOST_BOUND_RATE = 0.9  # a pair's small micro-batch below 90% of the large one's tokens/s: host-bound
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 * 1.0 + 4 / (64 * 256)  # 4-bit codes + int8 absmax per 64 (double quant) + fp32/256
DEQUANT_BYTES_PER_PARAM = NF4_BYTES_PER_PARAM + 2.0       # read NF4, write the bf16 copy (the matmul's read is below)
ADAM_STEP_BYTES_PER_PARAM = {"adamw_torch_fused": 28, "adamw_torch": 28, "adamw_cpu_offload": 0,
                             "adamw_8bit": 16, "paged_adamw_8bit": 16}  # bf16 p r/w, grad r, m/v r/w (+fp32 master)
# onecard is its own class: onecard bench measures it apart (bench/results/); lookup_efficiency falls back to the plain
# rows when a profile holds no row of the asked class.
KERNEL_CLASS = {"none": "none", "onecard": "onecard", "liger": "liger", "unsloth": "unsloth"}


@dataclass
class Throughput:
    gpu: str
    method: str
    flops: FlopsBreakdown
    ceiling_tokens_per_s: float
    compute_ceiling_tokens_per_s: float
    memory_ceiling_tokens_per_s: float
    estimate_tokens_per_s: float
    label: str                       # measured | calibrated | extrapolated | estimated
    efficiency: float
    efficiency_source: str
    step_s: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation of the estimate: all counted matmul FLOPs (recompute included) / peak."""
        return self.estimate_tokens_per_s / self.compute_ceiling_tokens_per_s

    def to_dict(self) -> dict:
        return {
            "gpu": self.gpu, "method": self.method,
            "ceiling_tokens_per_s": round(self.ceiling_tokens_per_s, 1),
            "compute_ceiling_tokens_per_s": round(self.compute_ceiling_tokens_per_s, 1),
            "memory_ceiling_tokens_per_s": round(self.memory_ceiling_tokens_per_s, 1),
            "estimate_tokens_per_s": round(self.estimate_tokens_per_s, 1), "label": self.label,
            "ceiling_label": "physical ceiling (datasheet peak, FLOPs model)",
            "efficiency": round(self.efficiency, 4), "efficiency_source": self.efficiency_source,
            "mfu": round(self.mfu, 4), "step_s": {k: round(v, 6) for k, v in self.step_s.items()},
            "flops": self.flops.as_dict(), "notes": list(self.notes),
        }


def weight_bytes_per_pass(shape, method: str) -> float:
    """Base weights one pass must read: bf16 everywhere, NF4 for QLoRA's block linears (the LM head stays bf16)."""
    p_layers = shape.num_hidden_layers * shape.linear_params_per_layer()
    p_head = shape.vocab_size * shape.hidden_size
    return (NF4_BYTES_PER_PARAM if method == "qlora" else 2.0) * p_layers + 2.0 * p_head


def ceilings(flops: FlopsBreakdown, gpu: GPU, shape, method: str, grad_ckpt: bool,
             recomputed_share: float | None = None) -> tuple[float, float]:
    """(compute ceiling, memory ceiling) in tokens/s. ``recomputed_share``: of the layers, those a checkpoint
    recomputes (default: all with ``grad_ckpt``, none without)."""
    compute = gpu.bf16_dense_tflops * 1e12 / flops.matmul_per_token
    share = (1.0 if grad_ckpt else 0.0) if recomputed_share is None else recomputed_share
    passes = 2 + share  # forward, backward (input grads), recompute
    per_token = passes * weight_bytes_per_pass(shape, method) / flops.tokens_per_microbatch
    return compute, gpu.bandwidth_gb_s * 1e9 / per_token


# --------------------------------------------------------------------------- efficiency lookup


def _layers(model: str) -> int:
    from onecard.catalog.models import resolve_shape

    return resolve_shape(model).num_hidden_layers


def layer_overhead_s(profile: Profile, gpu_id: str, kclass: str, grad_ckpt: bool | None = None) -> float:
    """Host time per decoder layer per optimizer step: Python dispatch and kernel launches of a layer's forward,
    recompute and backward (peft's per-projection modules, autograd bookkeeping, Triton launches). The host
    enqueues work asynchronously, so a step takes max(host time, device time): small micro-batches are
    host-bound. Fitted from pairs of measured rows that differ only in micro-batch: when the small one runs well
    below the large one's rate, its step time *is* the host time. Measured on the H200 (onecard bench): Llama 3 8B
    LoRA onecard b1 0.43 s/step against 0.21 s of device work (b8 runs 1.69 s for 8x the tokens): ~13 ms per layer;
    plain peft b1 0.39 s (seq 512 b1 also 0.38 s, while seq 4096 b1 is device-bound). Checkpointing changes it:
    onecard's kernels at b1 took 0.38 s per step with checkpointing and 0.16 s without (H200, Llama 3 8B,
    bench/results/h200-k11.jsonl), since non-reentrant checkpointing's recompute and bookkeeping run on the host too.
    Averaged over the pairs of the asked kernel class and ``grad_ckpt`` on the card; failing those, the class with
    either checkpointing, then any class, then any card; 0 without pairs."""
    groups: dict[tuple, list[Measurement]] = {}
    for m in profile.measurements:
        if gpu_id in (m.gpu, "*") and (kclass == "*" or KERNEL_CLASS.get(m.kernels, m.kernels) == kclass) \
                and grad_ckpt in (None, m.grad_ckpt):
            groups.setdefault((m.model, m.method, m.rank, m.seq_len, m.grad_ckpt, m.kernels, m.targets), []).append(m)
    fits, bounds = [], []
    for rows in groups.values():
        lo = min(rows, key=lambda m: m.micro_batch)
        hi = max(rows, key=lambda m: m.micro_batch)
        if hi.micro_batch <= lo.micro_batch:
            continue  # no pair
        per_layer_s = lo.micro_batch * lo.seq_len / lo.tokens_per_s / _layers(lo.model)
        # host-bound: its step time is the host time; else the host time is at most its step time
        (bounds if lo.tokens_per_s > HOST_BOUND_RATE * hi.tokens_per_s else fits).append(per_layer_s)
    if fits:
        return sum(fits) / len(fits)
    if grad_ckpt is not None:
        fallback = layer_overhead_s(profile, gpu_id, kclass)
    elif kclass != "*":
        fallback = layer_overhead_s(profile, gpu_id, "*")
    elif gpu_id != "*":  # host-side cost: a card without pairs takes the other cards' (CPU-bound)
        fallback = layer_overhead_s(profile, "*", kclass)
    else:
        fallback = 0.0
    return min([fallback, *bounds])


def host_bound(m: Measurement, host_per_layer_s: float) -> bool:
    """A row whose step time is (within 10%) the host time: its device efficiency is hidden behind the host."""
    return m.micro_batch * m.seq_len / m.tokens_per_s <= 1.1 * host_per_layer_s * _layers(m.model)


def measurement_efficiency(m: Measurement, gpu: GPU) -> float:
    """Achieved matmul FLOP/s / peak of a measured row, with the FLOPs of its own configuration."""
    from onecard.catalog.models import resolve_shape

    from onecard.plan.inputs import takes_split_halves

    shape = resolve_shape(m.model)
    kernels = KERNEL_CLASS.get(m.kernels, m.kernels)
    fl = flops_per_token(shape, method=m.method, seq_len=m.seq_len, micro_batch=m.micro_batch, rank=m.rank,
                         targets=None if m.targets == "all-linear" else m.targets.split(","), grad_ckpt=m.grad_ckpt,
                         kernels=kernels,
                         split_halves=takes_split_halves(shape, kernels, m.offload_activations, m.grad_ckpt))
    return m.tokens_per_s * fl.matmul_per_token / (gpu.bf16_dense_tflops * 1e12)


def extrapolate(eff: float, ref: GPU, card: GPU, memory_bound_share: float) -> float:
    """Move an efficiency measured on ``ref`` to ``card`` (see module docstring)."""
    m = memory_bound_share
    ratio = (ref.bandwidth_gb_s / card.bandwidth_gb_s) * (card.bf16_dense_tflops / ref.bf16_dense_tflops)
    return min(1.0, eff / ((1 - m) + m * ratio))


def _score(m: Measurement, cfg: dict) -> tuple:
    """Closer configurations sort first: same micro-batch, same model, same checkpointing, same seq, then the same
    checkpoint placement (on the card or offloaded). Between two micro-batches equally far off (b1 and b4 for b2),
    the larger: a small micro-batch's rate carries host overhead (layer_overhead_s) that the device efficiency
    should not inherit."""
    import math

    return (abs(math.log(m.micro_batch / cfg["micro_batch"])), m.micro_batch < cfg["micro_batch"],
            m.model != cfg["model"], m.grad_ckpt != cfg["grad_ckpt"], abs(math.log(m.seq_len / cfg["seq_len"])),
            m.offload_activations != cfg["offload_activations"])


def lookup_efficiency(cfg: dict, gpu: GPU, profile: Profile) -> tuple[float, str, str, Measurement | None]:
    """(efficiency, label, source text, exact row or None) for ``cfg`` (model, method, rank, seq_len, micro_batch,
    grad_ckpt, kernels) on ``gpu``. Efficiencies exclude the fixed per-step overhead (layer_overhead_s)."""
    from onecard.catalog.gpus import get_gpu

    kclass = KERNEL_CLASS.get(cfg["kernels"], "none")
    rows = [m for m in profile.measurements if KERNEL_CLASS.get(m.kernels, m.kernels) == kclass]
    if not rows and kclass == "onecard":  # no onecard measurement in this profile: plain efficiency
        rows = [m for m in profile.measurements if KERNEL_CLASS.get(m.kernels, m.kernels) == "none"]
    # QLoRA with peft's fp32 upcast of the non-NF4 parameters (plain transformers + peft) runs another step than
    # onecard's bf16 cast (train/model.py prepare_kbit): measured 2x apart on Llama 3 8B
    same_method = [m for m in rows if m.method == cfg["method"]
                   and bool(m.extra.get("kbit_upcast", False)) == cfg.get("kbit_upcast", False)]
    for m in same_method:
        if (m.gpu == gpu.id and m.kernels == cfg["kernels"] and m.model == cfg["model"] and m.rank == cfg["rank"]
                and m.seq_len == cfg["seq_len"] and m.micro_batch == cfg["micro_batch"]
                and m.grad_ckpt == cfg["grad_ckpt"] and m.offload_activations == cfg["offload_activations"]
                and cfg.get("all_linear", True)):
            return measurement_efficiency(m, gpu), "measured", f"measured: {m.id} ({m.date})", m
    host_s = {ckpt: layer_overhead_s(profile, gpu.id, kclass, ckpt) for ckpt in (False, True)}
    device_bound = [m for m in same_method if not host_bound(m, host_s[m.grad_ckpt])]
    same_method = [m for m in same_method if m in device_bound] or same_method  # see host_bound
    rows = [m for m in rows if not host_bound(m, host_s[m.grad_ckpt])] or rows
    here = sorted((m for m in same_method if m.gpu == gpu.id), key=lambda m: _score(m, cfg))
    if here:
        return measurement_efficiency(here[0], gpu), "calibrated", f"efficiency of {here[0].id} ({here[0].date})", None
    lora_rows = [m for m in rows if m.method == "lora"]
    pool = same_method or lora_rows
    if pool:
        best = sorted(pool, key=lambda m: (m.gpu != gpu.id, _score(m, cfg)))[0]
        ref = get_gpu(best.gpu)
        eff = measurement_efficiency(best, ref)
        borrowed = "" if same_method else f" (matmul efficiency of a {best.method} row; {cfg['method']}'s extra work added from bytes)"
        share = profile.memory_bound_share_for(kclass)
        if best.gpu != gpu.id:
            eff = extrapolate(eff, ref, gpu, share)
        label = "extrapolated" if same_method else "estimated"
        how = f"from {best.id} on {best.gpu}, moved to {gpu.id} (memory-bound share {share:g})" \
            if best.gpu != gpu.id else f"from {best.id}"
        return eff, label, how + borrowed, None
    return DEFAULT_EFFICIENCY, "estimated", f"default efficiency {DEFAULT_EFFICIENCY:g} (no measurement)", None


# --------------------------------------------------------------------------- the estimate


def estimate_throughput(inp, *, seq_len: int | None = None, memory_plan=None, profile: Profile | None = None,
                        grad_ckpt: bool | None = None) -> Throughput:
    """Ceiling and estimate for :class:`onecard.plan.inputs.PlanInputs` ``inp`` (``seq_len``: the effective
    sequence length when it differs from inp.seq_len, e.g. unpacked short examples)."""
    profile = profile or load_profile()
    gpu, shape, method = inp.gpu, inp.shape, inp.method
    ckpt = inp.grad_ckpt if grad_ckpt is None else grad_ckpt
    seq = seq_len or inp.seq_len
    if inp.cuda_graph and seq < inp.seq_len:  # a recorded step's rows are padded to data.seq_len (graphed_sft.py)
        full = estimate_throughput(inp, memory_plan=memory_plan, profile=profile, grad_ckpt=grad_ckpt)
        return replace(full, estimate_tokens_per_s=full.estimate_tokens_per_s * seq / inp.seq_len,
                       notes=[*full.notes, f"training.cuda_graph pads every row to data.seq_len: {seq:,} real tokens "
                              f"of {inp.seq_len:,} a row"])
    fl_span = varlen_span(inp.packed_example_tokens, inp.kernels)
    fl = flops_for_inputs(inp, seq_len=seq, grad_ckpt=ckpt)
    layers = shape.num_hidden_layers
    checkpointed = inp.with_(grad_ckpt=ckpt).recomputed_layers  # less training.uncheckpointed_layers
    recomputed = checkpointed / layers
    compute_ceiling, memory_ceiling = ceilings(fl, gpu, shape, method, ckpt, recomputed)
    ceiling = min(compute_ceiling, memory_ceiling)
    cfg = {"model": shape.id, "method": method, "rank": inp.rank, "seq_len": seq, "micro_batch": inp.micro_batch,
           "grad_ckpt": ckpt, "kernels": inp.kernels, "all_linear": len(inp.targets) == 7,
           "offload_activations": inp.offload_activations and ckpt,
           "kbit_upcast": method == "qlora" and inp.kbit_upcast}
    eff, label, source, exact = lookup_efficiency(cfg, gpu, profile)
    other_work = _unlike_measured_rows(inp, ckpt, fl_span, seq, exact)
    if exact is not None and other_work:  # a measured row of other work: its efficiency, this configuration's FLOPs
        label, source = "calibrated", f"efficiency of {exact.id} ({exact.date}), with the FLOPs of {other_work}"
        exact = None
    notes: list[str] = []
    if inp.kernels == "onecard" and not any(m.kernels == "onecard" for m in profile.measurements):
        notes.append("onecard's fused kernels have no measurement yet: the plain (unfused) efficiency is used")
    if inp.task in ("dpo", "kto"):
        notes.append(f"{inp.task}: the reference forward pass is not in the FLOPs; expect it slower")

    tokens = fl.tokens_per_microbatch
    bw = gpu.bandwidth_gb_s * 1e9
    steps = {"matmul_s": fl.matmul_per_token * tokens / (gpu.bf16_dense_tflops * 1e12 * eff),
             "weights_read_s": tokens / memory_ceiling}
    if inp.quant_base == "fp8":
        compute_ceiling, ceiling = _fp8_speed(inp, fl, steps, notes, compute_ceiling, memory_ceiling)
        exact, label = None, "estimated"  # a measured bf16 row of this shape is not this run's speed
    if method == "qlora":
        dequants = 2 + recomputed
        p_layers = shape.num_hidden_layers * shape.linear_params_per_layer()
        steps["qlora_dequant_s"] = dequants * p_layers * DEQUANT_BYTES_PER_PARAM / bw
    if method == "dora":
        p_tgt = shape.num_hidden_layers * sum(i * o for n, i, o in shape.linear_layers_per_block() if n in inp.targets)
        steps["dora_norm_s"] = (1 + recomputed) * p_tgt * 2.0 / bw  # read W (bf16) per forward pass
    steps.update(_optimizer_and_host_s(inp, memory_plan, bw))
    device_s = (max(steps["matmul_s"], steps["weights_read_s"], steps.get("host_overlapped_s", 0.0))
                + sum(v for k, v in steps.items() if k not in ("matmul_s", "weights_read_s", "host_overlapped_s")))
    kclass = KERNEL_CLASS.get(inp.kernels, "none")
    plain_layers = layers - checkpointed  # those run without a checkpoint: all of them without grad_ckpt
    steps["host_dispatch_s"] = 0.0 if inp.cuda_graph else sum(
        layer_overhead_s(profile, gpu.id, kclass, ckpt_layer) * n
        for ckpt_layer, n in ((True, checkpointed), (False, plain_layers)) if n)
    if inp.cuda_graph:  # the host queues one graph launch a micro-batch; the optimizer step's few stay eager
        notes.append("training.cuda_graph: forward and backward replay from one CUDA graph, so no host dispatch "
                     "time is on the step's path")
    step = max(device_s, steps["host_dispatch_s"])  # the host enqueues asynchronously: the slower side sets the pace
    estimate = min(ceiling, tokens / step)
    if exact is not None:
        estimate = min(ceiling, float(exact.tokens_per_s))
    if steps.get("host_serial_s", 0) > 0.1 * step:
        notes.append(f"host-link traffic ({gpu.host_link_gb_s:g} GB/s) is {steps['host_serial_s'] / step:.0%} of a step")
    notes.append(_bound_note(steps, device_s, inp, seq))
    return Throughput(gpu.id, method, fl, ceiling, compute_ceiling, memory_ceiling, estimate, label, eff, source,
                      {**steps, "step_s": step}, notes)


def _fp8_speed(inp, fl, steps, notes, compute_ceiling, memory_ceiling):
    """An FP8 base (plan/fp8.py, an estimate): the bf16 estimate with the frozen block GEMMs' share moved to the
    card's FP8 rate, plus the quantisers' and W transposes' DRAM traffic. Returns (compute ceiling, ceiling) and
    updates ``steps``."""
    from onecard.plan.fp8 import fp8_extra_bytes, fp8_matmul_seconds, fp8_speedup_bound, has_fp8

    if not has_fp8(inp.gpu):
        notes.append(f"quant.base fp8: {inp.gpu.id} has no FP8 tensor cores (training there is refused)")
        return compute_ceiling, min(compute_ceiling, memory_ceiling)
    steps["matmul_s"] = fp8_matmul_seconds(fl, inp.gpu, steps["matmul_s"])
    steps["fp8_quantise_s"] = fp8_extra_bytes(inp.shape, fl.tokens_per_microbatch, inp.recomputed_layers) / (
        inp.gpu.bandwidth_gb_s * 1e9)
    bound = fp8_speedup_bound(fl, inp.gpu)
    compute_ceiling *= bound
    notes.append(f"quant.base fp8: frozen GEMMs at {inp.gpu.fp8_dense_tflops:g} TFLOP/s (FP8 peak), the rest bf16: "
                 f"at most {bound:.2f}x bf16's matmul time; the estimate keeps the bf16 step's other work and adds "
                 "the quantisation passes")
    return compute_ceiling, min(compute_ceiling, memory_ceiling)


def _bound_note(steps: dict, device_s: float, inp, seq: int) -> str:
    """What sets the pace. Host-bound (small models, small micro-batches): the estimate is the host's dispatch
    time, which every card shares, so say so instead of ranking cards by a figure their hardware does not set."""
    at = f"micro-batch {inp.micro_batch} x {seq} tokens"
    if steps["host_dispatch_s"] > device_s:  # the spread: bench/results/host_overhead_14b_2026-12-04_rounds.txt
        layers = inp.shape.num_hidden_layers
        return (f"host-bound at {at}: launching {layers} layers' work takes {steps['host_dispatch_s']:.3f} s a "
                f"micro-batch, the card's own work {device_s:.3f} s: every card runs at about this speed (the cheapest "
                f"that fits is the one to rent), a larger micro-batch costs little time, and the host figure is "
                f"carried over from larger models (onecard bench measures this one); it is the CPU's speed, which "
                f"wanders: one process's host-bound steps spread over a factor of 1.6 on the H200 test machine")
    bound = "memory" if steps["weights_read_s"] > steps["matmul_s"] else "compute"
    return f"{bound}-bound at {at}"


def _unlike_measured_rows(inp, ckpt: bool, span: int | None, seq: int, exact: Measurement | None) -> str:
    """What this configuration does that the exact bench row of its shape does not (bench rows run unpacked rows;
    whole layers unless they offloaded checkpoints too), as words; empty when nothing."""
    split_unmeasured = ckpt and inp.split_halves and not (exact is not None and exact.offload_activations)
    work = [why for why, on in (("split halves", split_unmeasured),
                                ("attention within packed examples", span is not None and span < seq),
                                (f"the last {inp.uncheckpointed_layers} layers not checkpointed",
                                 ckpt and inp.uncheckpointed_layers > 0)) if on]
    return " and ".join(work)


def _optimizer_and_host_s(inp, memory_plan, bw: float) -> dict:
    """Per micro-batch: the optimizer step's DRAM traffic and host-link traffic (amortised over grad_accum)."""
    from onecard.plan import static

    tensors = static.trainable_tensors(inp.shape, inp.method, inp.rank, inp.targets)
    trainable = sum(tensors)
    link = inp.gpu.host_link_gb_s * 1e9
    out = {"optimizer_s": trainable * ADAM_STEP_BYTES_PER_PARAM.get(inp.optimizer, 28) / bw / inp.grad_accum}
    serial = 0.0
    if inp.optimizer == "adamw_cpu_offload":  # grads down, updated params up; not overlapped with compute
        serial += trainable * (static.trainable_dtype_bytes(inp.method, inp.dtype_bytes) + inp.dtype_bytes) / link
    if memory_plan is not None and inp.optimizer == "paged_adamw_8bit":
        spilled = max(0, memory_plan.required_bytes + memory_plan.spillable_bytes - memory_plan.capacity_bytes)
        serial += 2 * spilled / link  # paged out and back in at each optimizer step
    if serial:
        out["host_serial_s"] = serial / inp.grad_accum
    if inp.offload_activations and inp.grad_ckpt:  # checkpoints out in forward (side stream), back in backward
        per_layer = 2 if inp.split_halves else 1  # split halves: the MLP half's input too (patch/blocks.py)
        ckpt_bytes = per_layer * inp.shape.num_hidden_layers * inp.shape.hidden_size * 2 * inp.tokens_per_micro_batch
        out["host_overlapped_s"] = 2 * ckpt_bytes / link
    return out


def claim_check(inp, claim_tokens_per_s: float, *, seq_len: int | None = None) -> dict:
    """Is ``claim_tokens_per_s`` physically possible for this model/method/sequence on this card?

    Judged against the most lenient ceiling for the method: no gradient checkpointing (recompute is a choice),
    causal attention kernels, datasheet peak. The recipe's own ceiling (with its checkpointing) is given as well.
    """
    seq = seq_len or inp.seq_len
    fl = flops_per_token(inp.shape, method=inp.method, seq_len=seq, micro_batch=inp.micro_batch, rank=inp.rank,
                         targets=inp.targets, grad_ckpt=False)
    best = min(ceilings(fl, inp.gpu, inp.shape, inp.method, False))
    own_fl = flops_per_token(inp.shape, method=inp.method, seq_len=seq, micro_batch=inp.micro_batch, rank=inp.rank,
                             targets=inp.targets, grad_ckpt=inp.grad_ckpt,
                             attention="eager" if inp.attn == "eager" else "flash", kernels=inp.kernels)
    own = min(ceilings(own_fl, inp.gpu, inp.shape, inp.method, inp.grad_ckpt))
    factor = claim_tokens_per_s / best
    needed_tflops = claim_tokens_per_s * fl.matmul_per_token / 1e12
    possible = factor <= 1.0
    verdict = (f"possible: {claim_tokens_per_s:,.0f} tokens/s is {factor:.0%} of the ceiling" if possible else
               f"physically impossible: {claim_tokens_per_s:,.0f} tokens/s is {factor:.2f}x the ceiling of "
               f"{best:,.0f} tokens/s (it needs {needed_tflops:,.0f} TFLOP/s of matmuls; the card peaks at "
               f"{inp.gpu.bf16_dense_tflops:g})")
    return {"claim_tokens_per_s": claim_tokens_per_s, "ceiling_tokens_per_s": round(best, 1),
            "ceiling_config": "no gradient checkpointing, causal attention, datasheet bf16 peak",
            "recipe_ceiling_tokens_per_s": round(own, 1), "factor_over_ceiling": round(factor, 3),
            "physically_possible": possible, "needed_tflops": round(needed_tflops, 1),
            "peak_tflops": inp.gpu.bf16_dense_tflops, "verdict": verdict, "label": "ceiling (physics)"}
