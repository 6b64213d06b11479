"""The memory plan: every component of peak GPU memory for one training step, in bytes.

Peak memory is not a plain sum: a training step passes through phases, and the peak is the worst of them --
(a) start of backward, when the logits and cross-entropy buffers are largest; (b) inside one checkpointed block's
backward, when that block's recomputed activations and its gradients are alive; (c) for DPO/KTO, the no-grad
reference pass. Static memory (weights, adapters, gradients, optimizer state) and the saved activations are alive in
all phases. Each :class:`Component` says whether it is part of the peak phase, so the peak rows sum to the total.

Exact terms live in plan/static.py (tested to the byte); estimated ones in plan/activations.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from onecard.catalog.families import NOT_UNDER_FSDP, NOT_UNDER_FSDP_FIX
from onecard.plan import activations as act
from onecard.plan import static
from onecard.plan.fp8 import fp8_backward_transient_bytes, fp8_base_weight_bytes
from onecard.plan.fsdp_load import fsdp_load_bytes, quant_constant_bytes
from onecard.plan.inputs import PlanInputs

GIB = 2**30
# PyTorch's caching allocator reserves more than it allocates (block rounding, split blocks it cannot reuse).
# Prior, to be replaced by measured reserved/allocated ratios (bench issue): 5% of the allocated peak.
ALLOCATOR_SLACK_FRACTION = 0.05
# CUDA context + cuBLAS/cuDNN handles + loaded kernels: outside torch's allocator (nvidia-smi sees it,
# max_memory_reserved does not). ~0.5 GiB with CUDA 12 lazy module loading; calibrate per card.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
TIGHT_FRACTION = 0.05


@dataclass
class Component:
    key: str
    label: str
    bytes: int
    where: str = "device"           # device | host
    in_allocator: bool = True       # False: outside torch's caching allocator (context, paged optimizer state)
    at_peak: bool = True            # part of the peak phase (rows with at_peak sum to the total)
    kind: str = "exact"             # exact | estimated
    note: str = ""

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class MemoryPlan:
    inputs: PlanInputs
    components: list[Component]
    peak_phase: str
    capacity_bytes: int
    allocator_bytes: int = 0       # what torch.cuda.max_memory_reserved would report
    required_bytes: int = 0        # must fit on the card: allocator + context
    spillable_bytes: int = 0       # paged optimizer state: on the card when there is room, else on the host
    host_bytes: int = 0
    verdict: str = ""              # fits | tight | does not fit
    load_bytes: int = 0            # FSDP's load phase per GPU (plan/fsdp_load.py), 0 on one GPU
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.required_bytes + self.spillable_bytes

    @property
    def fits(self) -> bool:
        return self.verdict != "does not fit"

    def component(self, key: str) -> Component | None:
        return next((c for c in self.components if c.key == key), None)

    def to_dict(self) -> dict:
        inp = self.inputs
        return {
            "model": inp.shape.id, "gpu": inp.gpu.id, "method": inp.method, "task": inp.task,
            "seq_len": inp.seq_len, "micro_batch": inp.micro_batch, "grad_accum": inp.grad_accum,
            "rank": inp.rank if inp.is_adapter else None, "optimizer": inp.optimizer, "grad_ckpt": inp.grad_ckpt,
            "uncheckpointed_layers": inp.uncheckpointed_layers, "offload_activations": inp.offload_activations,
            "kernels": inp.kernels, "fused_ce": inp.fused_ce, "attn": inp.attn, "num_gpus": inp.num_gpus,
            "components": [{**asdict(c), "gib": round(c.gib, 3)} for c in self.components],
            "peak_phase": self.peak_phase, "allocator_bytes": self.allocator_bytes,
            "required_bytes": self.required_bytes, "spillable_bytes": self.spillable_bytes,
            "host_bytes": self.host_bytes, "total_bytes": self.total_bytes, "total_gib": round(self.total_bytes / GIB, 3),
            "capacity_bytes": self.capacity_bytes, "capacity_gib": round(self.capacity_bytes / GIB, 3),
            "verdict": self.verdict, "notes": self.notes, "label": "estimated", "load_bytes": self.load_bytes,
        }


def _static_components(p: PlanInputs) -> list[Component]:
    shape, n = p.shape, p.num_gpus
    # Sharded (FSDP) QLoRA keeps frozen norms/embeddings bf16: one dtype per flat parameter (train/distributed.py).
    upcast = p.kbit_upcast and n == 1
    out = [Component("weights", _weights_label(p), _base_bytes(p, upcast) // n)]
    if n > 1 and p.method == "qlora":  # QuantStates are not parameters: whole on every GPU, 1/n of them counted above
        constants = quant_constant_bytes(p)
        out.append(Component("quant_state", "NF4 quantisation constants (whole on every GPU: FSDP shards parameters "
                             "only)", constants - constants // n))
    if p.task in ("dpo", "kto") and p.reference == "copy":
        out.append(Component("reference", "reference model (frozen copy)",
                             static.base_weight_bytes(shape, "full", p.dtype_bytes) // n))
    tensors = static.trainable_tensors(shape, p.method, p.rank, p.targets)
    tbytes = static.trainable_dtype_bytes(p.method, p.dtype_bytes)
    if p.is_adapter:
        out.append(Component("adapter", f"{p.method} adapter weights (r={p.rank}, fp32)", sum(tensors) * tbytes // n))
        # A and B in the compute dtype (patch/adapter_copies.py); with LoRA dropout peft casts per use instead
        if p.kernels == "onecard" and p.lora_dropout == 0 and tbytes != p.dtype_bytes:
            copies = sum(static.trainable_tensors(shape, "lora", p.rank, p.targets)) * p.dtype_bytes
            out.append(Component("adapter_copies", "adapter A/B cast for onecard's kernels (one copy per step)", copies))
    out.append(Component("gradients", "gradients (trainable params)", sum(tensors) * tbytes // n))
    opt = static.optimizer_state_bytes(tensors, p.optimizer, tbytes) // n
    if p.optimizer == "paged_adamw_8bit":
        out.append(Component("optimizer", "optimizer state (paged, spillable to host)", opt, in_allocator=False,
                             note="CUDA unified memory: outside torch's allocator, migrates to host under pressure"))
    elif p.optimizer == "adamw_cpu_offload":
        out.append(Component("optimizer", "optimizer state (on host)", opt, where="host"))
    else:
        out.append(Component("optimizer", f"optimizer state ({p.optimizer})", opt))
    return out


def _base_bytes(p: PlanInputs, upcast: bool) -> int:
    if p.quant_base == "fp8":
        return fp8_base_weight_bytes(p.shape, p.dtype_bytes)
    return static.base_weight_bytes(p.shape, p.method, p.dtype_bytes, double_quant=p.double_quant, kbit_upcast=upcast)


def _weights_label(p: PlanInputs) -> str:
    if p.quant_base == "fp8":
        return "base weights (FP8 e4m3 block linears + per-channel scales; embeddings/head/norms bf16)"
    if p.method == "qlora":
        dq = " + double quant" if p.double_quant else ""
        rest = "fp32" if p.kbit_upcast and p.num_gpus == 1 else "bf16"
        return f"base weights (NF4{dq}; embeddings/norms {rest})"
    return f"base weights ({'bf16' if p.dtype_bytes == 2 else 'fp32'})"


def plan_memory(p: PlanInputs) -> MemoryPlan:
    """Plan peak memory for one GPU of the run described by ``p`` (see module docstring for the phases)."""
    shape = p.shape
    comps = _static_components(p)
    tokens = p.tokens_per_micro_batch
    act_bytes = _activation_bytes(p)
    halves = act.layer_activation_parts_per_token(shape, method=p.method, targets=p.targets, rank=p.rank,
                                                  kernels=p.kernels, attn=p.attn, seq_len=p.seq_len,
                                                  act_bytes=act_bytes)
    layer_tok = sum(halves.values())
    layers = shape.num_hidden_layers
    dora_down_kept = p.method == "dora" and p.kernels == "onecard" and "down_proj" in p.targets
    per_layer_saved = act.checkpoint_bytes_per_token(shape, act_bytes, dora_down_kept) if p.grad_ckpt else layer_tok
    # split halves (patch/blocks.py): each layer also keeps its MLP half's input, in host memory
    per_layer_total = per_layer_saved + (act_bytes * shape.hidden_size if p.split_halves else 0)
    head = act.head_activation_bytes_per_token(shape, p.kernels, act_bytes) * tokens  # after the layers: never offloaded
    kept_layers = layers - p.recomputed_layers if p.grad_ckpt else 0  # training.uncheckpointed_layers
    kept = kept_layers * layer_tok * tokens  # all their activations
    saved = (layers - kept_layers) * per_layer_total * tokens + kept + head
    what = ("half-layer inputs (checkpoints)" if p.split_halves else
            "block inputs (checkpoints)" if p.grad_ckpt else "all block activations")
    if kept:
        what += f"; all activations of the last {kept_layers} layers (not checkpointed)"
    offloaded = p.offload_activations and p.grad_ckpt  # the trainer offloads checkpoints only (patch/offload.py)
    if offloaded:
        in_flight = 2 * per_layer_saved * tokens if p.recomputed_layers else 0
        comps.append(Component("activations", f"saved activations: 2 {what} in flight + the head's",
                               in_flight + kept + head, kind="estimated"))
        comps.append(Component("activations_host", f"saved activations: {what} offloaded",
                               saved - head - kept - in_flight, where="host", kind="estimated"))
    else:
        comps.append(Component("activations", f"saved activations: {what}", saved, kind="estimated"))
    saved_device = in_flight + kept + head if offloaded else saved

    logits_bytes = static.FP32 if (p.method == "qlora" and p.kbit_upcast) else p.dtype_bytes
    ce = act.logits_ce_bytes(shape, tokens, fused_ce=p.fused_ce, logits_bytes=logits_bytes, hold_logits=p.hold_logits,
                             in_place=p.kernels == "onecard")
    held = 0 if p.fused_ce or not p.hold_logits else logits_bytes * tokens * shape.vocab_size
    # one recompute brings back a whole block, or with split halves the larger half (the attention half's tensors
    # are gone while the MLP half's backward runs, patch/blocks.py)
    recomputed = max(halves.values()) if p.split_halves else layer_tok
    recompute = (recomputed if p.recomputed_layers else 0) * tokens
    block = recompute + act.backward_transient_bytes_per_token(shape, act_bytes, p.kernels) * tokens + held
    if p.quant_base == "fp8":
        block += fp8_backward_transient_bytes(shape, tokens, p.kernels)
    # Gradients fill in during backward (zero_grad(set_to_none) frees them every step), so they are a per-phase
    # term, not static (bench calibration: full fine-tuning of Llama 3.2 1B on the H200 was planned 18-23%
    # high when all gradients sat beside the logits). At the logits phase only the LM head's gradient exists (the
    # tied embedding's, for tied models); in block j's backward the later blocks' gradients exist while the earlier
    # blocks' saved activations still wait -- linear in j, so the worst case is an end: max(head grad, all grads
    # minus the saved activations already freed). After backward the optimizer step holds every gradient.
    grads_total = _component_bytes(comps, "gradients")
    head_grad = _head_grad_bytes(p)
    # A graphed step's gradients keep their addresses from one replay to the next (train/graphed_step.py zeroes them
    # in place), so every one of them sits beside the backward's peak.
    grads_in_backward = grads_total if p.cuda_graph else max(head_grad, grads_total - saved_device)
    phases = {"logits + cross-entropy": ce + head_grad,
              "block backward": block + grads_in_backward,
              "optimizer step": grads_total - saved_device}
    if p.task in ("dpo", "kto"):
        phases["reference pass"] = _no_grad_forward_bytes(p, layer_tok, logits_bytes)
    peak_phase = max(phases, key=phases.get)
    grads_at_peak = {"logits + cross-entropy": head_grad, "block backward": grads_in_backward,
                     "optimizer step": grads_total}.get(peak_phase, grads_total)
    for c in comps:
        if c.key == "gradients":
            c.at_peak = False
    comps.append(Component("gradients_at_peak", "gradients alive at the peak (filled during backward)",
                           min(grads_at_peak, grads_total), kind="estimated"))
    if peak_phase == "optimizer step":
        for c in comps:
            if c.key == "activations":
                c.at_peak = False
    ce_label = "logits + cross-entropy " + ("(fused, chunked)" if p.fused_ce else "(fp32 upcast, full vocab)")
    comps.append(Component("logits", ce_label, ce, at_peak=peak_phase == "logits + cross-entropy", kind="estimated"))
    blabel = ("one half-block recomputed + its gradients" if p.split_halves else
              "one block recomputed + its gradients" if p.grad_ckpt else "gradients inside one block")
    comps.append(Component("block_backward", blabel + (" (+ held logits)" if held else ""), block,
                           at_peak=peak_phase == "block backward", kind="estimated"))
    if "reference pass" in phases:
        comps.append(Component("reference_pass", "reference forward (no grad)", phases["reference pass"],
                               at_peak=peak_phase == "reference pass", kind="estimated"))
    if p.cuda_graph and p.heldout_loss:
        comps.append(Component("eval_beside_graph", "held-out eval's forward (no grad), beside the graph's pool",
                               _no_grad_forward_bytes(p, layer_tok, logits_bytes), kind="estimated",
                               note="the eval runs eagerly between replays; the caching allocator never lends a "
                               "graph's private pool to eager work, so its blocks add to the step's"))
    comps.append(Component("workspace", "cuBLAS workspace + temporaries", _workspace(p), kind="estimated"))
    allocated = sum(c.bytes for c in comps if c.at_peak and c.where == "device" and c.in_allocator)
    slack = max(int(allocated * ALLOCATOR_SLACK_FRACTION), _freed_logits_blocks_bytes(p, logits_bytes))
    comps.append(Component("slack", "allocator slack (cached, unusable blocks)", slack, kind="estimated"))
    if p.num_gpus > 1:
        comps.append(Component("fsdp_gather_cache", "FSDP all-gather stream's cached root unit (embeddings, head)",
                               _fsdp_root_unit_bytes(p), kind="estimated"))
    comps.append(Component("cuda_context", "CUDA context (outside torch allocator)", CUDA_CONTEXT_BYTES,
                           in_allocator=False, kind="estimated"))
    return _finish(p, comps, peak_phase)


def _activation_bytes(p: PlanInputs) -> int:
    """Element size of the residual stream: fp32 for QLoRA after prepare_model_for_kbit_training (fp32 embeddings and
    norms make the hidden states fp32; see activations.layer_activation_parts_per_token), else bf16."""
    return static.FP32 if (p.method == "qlora" and p.kbit_upcast) else act.BF16


def _component_bytes(comps: list[Component], key: str) -> int:
    return sum(c.bytes for c in comps if c.key == key)


def _head_grad_bytes(p: PlanInputs) -> int:
    """Full fine-tuning: the LM head's (or the tied embedding's) gradient is the first one backward writes."""
    if p.method != "full":
        return 0
    return p.shape.vocab_size * p.shape.hidden_size * static.trainable_dtype_bytes(p.method, p.dtype_bytes) // p.num_gpus


def _freed_logits_blocks_bytes(p: PlanInputs, logits_bytes: int) -> int:
    """Reserved-but-unusable memory of the unfused loss (bench calibration).

    The unfused cross-entropy frees an fp32 tokens x vocab tensor (the upcast of the logits) before backward
    allocates its own fp32 tokens x vocab gradients; the caching allocator keeps the freed block, and on the H200
    max_memory_reserved exceeded max_memory_allocated by about one such block (7.3 GiB against 7.8 at 16k tokens x
    128k vocab; 9.0 against 9.3 at Qwen's 152k vocab; 3.8 against 3.9 at 8k tokens). When the logits are already
    fp32 (QLoRA's upcast LM head), the training loss's shifted slice ``logits[:, :-1]`` gets its gradient through a
    zero-filled fp32 tensor of the full logits (SliceBackward; with bf16 logits that tensor is bf16), and with more
    than one row per micro-batch the reshape of that slice copies it: a second fp32 block. Measured: QLoRA 7B at
    4k x 1 held 1.8 blocks above allocated, QLoRA 8B at 2k x 8 2.4 blocks.
    """
    if p.fused_ce:
        return 0
    block = static.FP32 * p.tokens_per_micro_batch * p.shape.vocab_size
    copies = 2 if logits_bytes == static.FP32 else 1
    return copies * block


def _no_grad_forward_bytes(p: PlanInputs, layer_tok: int, logits_bytes: int) -> int:
    """A forward of one micro-batch under no_grad: nothing is saved, so the pass holds one block's activations
    (freed as it goes) and the logits plus their fp32 log-softmax (or one chunk, fused).

    DPO/KTO's reference log-probs are such a pass (KTO's KL pass over mismatched completions is no larger; a LoRA
    reference is the base with adapters disabled, no second copy of the weights), and so is the held-out loss
    between graphed steps, which runs in batches of the training micro-batch. Measured there (H100, torch 2.11,
    bench/results/h100/graph_memory_2026-12-07.jsonl): the eager pool grew by 0.63 GiB for Qwen 2.5 14B FP8 at
    2 x 2,048 tokens (this: 0.72) and by 2.16 GiB for Llama 3 8B at 8 x 2,048 (this: 2.18)."""
    tokens = p.tokens_per_micro_batch
    v = p.shape.vocab_size
    if p.fused_ce:
        logits = act.ce_chunk_tokens(tokens, p.shape) * v * (static.FP32 + 2)
    else:
        logits = tokens * v * (logits_bytes + static.FP32)
    return layer_tok * tokens + logits


def _fsdp_root_unit_bytes(p: PlanInputs) -> int:
    """FSDP gathers the root unit -- what no decoder-layer unit holds: the embeddings, an untied LM head, the final
    norm -- at full size on its all-gather stream (measured under FSDP1; onecard's FSDP2 gathers the embedding and
    the norm + head as two units, on its own all-gather stream: to be re-measured, notes/multigpu-gpu-todo.md). That block is freed before the backward peak but stays in the
    caching allocator's pool of *that* stream, which the compute stream cannot reuse: reserved, never allocated at
    the peak. Found in torch.cuda.memory_snapshot() on 2 x H200 (bench/distributed_probe.py --memory-snapshot,
    bench/results/h200x2-multigpu.jsonl): the all-gather stream held 4.72 GiB with nothing allocated, its
    largest block 3.916 GiB = Llama 3 70B's embeddings + head (2 x 128256 x 8192 x 2 bytes), the rest two layer
    units; on Llama 3 8B 2.78 GiB = 1.96 (its root) + two layers."""
    s = p.shape
    matrices = 1 if s.tie_word_embeddings else 2
    return (matrices * s.vocab_size + 1) * s.hidden_size * p.dtype_bytes


def _workspace(p: PlanInputs) -> int:
    ws = act.workspace_bytes(p.shape, p.method, p.targets, p.kernels)
    if p.num_gpus > 1:  # FSDP all-gathers one block's full bf16 parameters, with one block prefetched
        ws += 2 * p.shape.params_per_layer() * p.dtype_bytes
    return ws


def _finish(p: PlanInputs, comps: list[Component], peak_phase: str) -> MemoryPlan:
    peak = [c for c in comps if c.at_peak and c.where == "device"]
    allocator = sum(c.bytes for c in peak if c.in_allocator)
    context = sum(c.bytes for c in peak if not c.in_allocator and c.key == "cuda_context")
    spillable = sum(c.bytes for c in peak if not c.in_allocator and c.key != "cuda_context")
    host = sum(c.bytes for c in comps if c.where == "host")
    cap = p.gpu.memory_bytes
    required = allocator + context
    if required > cap:
        verdict = "does not fit"
    elif required + spillable > (1 - TIGHT_FRACTION) * cap:
        verdict = "tight"
    else:
        verdict = "fits"
    load = fsdp_load_bytes(p, CUDA_CONTEXT_BYTES)
    if load > cap:
        verdict = "does not fit"
    plan = MemoryPlan(p, comps, peak_phase, cap, allocator, required, spillable, host, verdict, load_bytes=load)
    if load:
        plan.notes.append(f"loading: {load / GIB:.1f} GiB per GPU ({load:,} bytes with the CUDA context; rank 0 reads "
                          "the weights into host memory, each GPU keeps its shards plus one whole tensor at a time; "
                          "plan/fsdp_load.py)" + (", more than the card holds" if load > cap else ""))
    if p.num_gpus > 1 and p.method in NOT_UNDER_FSDP:
        plan.notes.append(f"{NOT_UNDER_FSDP[p.method]}; onecard train refuses it: {NOT_UNDER_FSDP_FIX}")
    if spillable and required <= cap < required + spillable:
        plan.notes.append("paged optimizer state does not all fit beside the rest: part of it will live on the "
                          "host and each optimizer step pages it over the host link (slower)")
    return plan
