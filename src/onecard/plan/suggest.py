"""When a plan does not fit: the cheapest changes that make it fit, each re-planned with its new total.

Order is the cost to the user (speed, quality, money), cheapest first: a smaller micro-batch with more
accumulation keeps the effective batch and the maths; checkpointing and fused CE cost a little speed; an 8-bit or
paged optimizer and activation offload cost a little more (offload costs nothing with onecard's kernels, which then
recompute less: :func:`also_worth_it` says so even when the plan fits); QLoRA changes the model's numerics; a bigger
card or more GPUs cost money. Each suggestion is a real :func:`plan_memory` call, never a rule of thumb.
"""

from __future__ import annotations

from dataclasses import dataclass

from onecard.catalog.families import NOT_UNDER_FSDP
from onecard.catalog.gpus import GPUS
from onecard.plan.inputs import PlanInputs
from onecard.plan.memory import GIB, MemoryPlan, plan_memory


@dataclass
class Suggestion:
    change: str          # what to do, in words
    set: dict            # recipe overrides (--set keys) that do it
    total_bytes: int
    verdict: str

    def to_dict(self) -> dict:
        return {"change": self.change, "set": self.set, "total_bytes": self.total_bytes,
                "total_gib": round(self.total_bytes / GIB, 3), "verdict": self.verdict}


def most_uncheckpointed_layers(p: PlanInputs) -> int:
    """The most last layers that can go without checkpoints (``training.uncheckpointed_layers``) with the plan
    still fitting (not tight), 0 when none can; memory grows with each layer left out, so a bisection."""
    lo, hi = 0, p.shape.num_hidden_layers
    if plan_memory(p.with_(uncheckpointed_layers=0)).verdict != "fits":
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan_memory(p.with_(uncheckpointed_layers=mid)).verdict == "fits":
            lo = mid
        else:
            hi = mid - 1
    return lo


def _candidates(p: PlanInputs) -> list[tuple[str, dict, PlanInputs]]:
    out: list[tuple[str, dict, PlanInputs]] = []
    if p.grad_ckpt and p.uncheckpointed_layers:  # the cheapest: give back some of the recompute it saved
        k = most_uncheckpointed_layers(p)
        out.append((f"{k} layers without checkpoints instead of {p.uncheckpointed_layers}",
                    {"training.uncheckpointed_layers": k}, p.with_(uncheckpointed_layers=k)))
    for mb in range(p.micro_batch - 1, 0, -1):
        accum = max(1, round(p.micro_batch * p.grad_accum / mb))
        if plan_memory(p.with_(micro_batch=mb, grad_accum=accum)).fits or mb == 1:
            out.append((f"micro-batch {mb} x grad-accum {accum} (same effective batch)",
                        {"training.micro_batch_size": mb, "training.grad_accum": accum},
                        p.with_(micro_batch=mb, grad_accum=accum)))
            break
    if not p.grad_ckpt:
        out.append(("gradient checkpointing on", {"training.grad_ckpt": True}, p.with_(grad_ckpt=True)))
    if not p.fused_ce and p.task not in ("dpo", "kto"):  # preference steps need full logits (plan/inputs.py)
        out.append(("onecard kernels (fused chunked cross-entropy)", {"training.kernels": "onecard"},
                    p.with_(kernels="onecard", fused_ce=True)))
    if p.optimizer in ("adamw_torch", "adamw_torch_fused"):
        out.append(("8-bit AdamW (bitsandbytes)", {"training.optimizer": "adamw_8bit"}, p.with_(optimizer="adamw_8bit")))
        out.append(("paged 8-bit AdamW", {"training.optimizer": "paged_adamw_8bit"},
                    p.with_(optimizer="paged_adamw_8bit")))
    if p.method == "full" and p.optimizer != "adamw_cpu_offload":
        out.append(("optimizer state offloaded to CPU", {"training.optimizer": "adamw_cpu_offload"},
                    p.with_(optimizer="adamw_cpu_offload")))
    if not p.offload_activations:
        out.append((_without_graph(p, "offload activation checkpoints to host"),
                    {"training.offload_activations": True, "training.grad_ckpt": True, **_graph_off(p)},
                    p.with_(offload_activations=True, grad_ckpt=True, cuda_graph=False)))
    if p.method in ("lora", "dora"):
        out.append(("QLoRA (NF4 base weights)", {"method": "qlora"}, p.with_(method="qlora")))
    return out


def _graph_off(p: PlanInputs) -> dict:
    """The override a change that copies to or from host memory inside the step adds to a graphed recipe: a CUDA
    graph cannot hold host copies (plan/cuda_graph.py), so the change costs the graph."""
    return {"training.cuda_graph": False} if p.cuda_graph else {}


def _without_graph(p: PlanInputs, change: str) -> str:
    return change + " (without the CUDA graph, which cannot hold host copies)" if p.cuda_graph else change


def _combined(p: PlanInputs, singles: list[tuple[str, dict, PlanInputs]]) -> tuple[str, dict, PlanInputs] | None:
    """Apply the non-hardware changes cumulatively, cheapest first, until the plan fits (micro-batch last: it is
    re-derived at the end as the largest that then fits)."""
    names, sets, cur = [], {}, p
    for change, overrides, _ in singles:
        if change.startswith("micro-batch") or "paged" in change:
            continue
        cur = _apply(cur, overrides)
        names.append(change)
        sets.update(overrides)
        for mb in range(p.micro_batch, 0, -1):
            trial = cur.with_(micro_batch=mb, grad_accum=max(1, round(p.micro_batch * p.grad_accum / mb)))
            if plan_memory(trial).fits:
                if mb != p.micro_batch:
                    names.append(f"micro-batch {mb} x grad-accum {trial.grad_accum}")
                    sets.update({"training.micro_batch_size": mb, "training.grad_accum": trial.grad_accum})
                return " + ".join(names), sets, trial
    return None


def _apply(p: PlanInputs, overrides: dict) -> PlanInputs:
    keys = {"training.grad_ckpt": "grad_ckpt", "training.optimizer": "optimizer", "method": "method",
            "training.offload_activations": "offload_activations",
            "training.uncheckpointed_layers": "uncheckpointed_layers", "training.cuda_graph": "cuda_graph"}
    changes = {keys[k]: v for k, v in overrides.items() if k in keys}
    if overrides.get("training.kernels") == "onecard":
        changes.update(kernels="onecard", fused_ce=True)
    return p.with_(**changes)


def suggest_fixes(plan: MemoryPlan, max_gpus: int = 8) -> list[Suggestion]:
    """Changes that make ``plan`` fit, cheapest first. Empty when it already fits."""
    if plan.fits:
        return []
    p = plan.inputs
    out: list[Suggestion] = []
    singles = _candidates(p)
    for change, overrides, trial in singles:
        new = plan_memory(trial)
        if new.fits:
            out.append(Suggestion(change, overrides, new.total_bytes, new.verdict))
    combo = _combined(p, singles)
    if combo is not None and " + " in combo[0]:  # a multi-step recipe change, useful beside (or instead of) singles
        new = plan_memory(combo[2])
        out.append(Suggestion(combo[0], combo[1], new.total_bytes, new.verdict))
    stream = streaming_fix(plan)
    if stream is not None:
        out.append(stream)
    for gpu in sorted(GPUS.values(), key=lambda g: g.memory_gib):
        if gpu.memory_gib > p.gpu.memory_gib:
            new = plan_memory(p.with_(gpu=gpu))
            if new.fits:
                out.append(Suggestion(f"a larger card: {gpu.id} ({gpu.memory_gib:.0f} GiB)", {"plan.gpu": gpu.id},
                                      new.total_bytes, new.verdict))
                break
    fsdp_counts = range(max(2, p.num_gpus + 1), max_gpus + 1) if p.method not in NOT_UNDER_FSDP else ()
    for n in fsdp_counts:  # (a method onecard train refuses under FSDP gets no GPU count)
        new = plan_memory(p.with_(num_gpus=n))
        if new.fits:
            out.append(Suggestion(f"{n} x {p.gpu.id} with FSDP (per-GPU total)", {"training.num_gpus": n},
                                  new.total_bytes, new.verdict))
            break
    return out


def streaming_fix(plan: MemoryPlan) -> Suggestion | None:
    """Stream the frozen base weights from pinned host memory (plan/streaming.py), unless the recipe says not to or
    it would not fit either. The change names the resident layers and the host bytes."""
    from onecard.plan.streaming import plan_streaming

    p = plan.inputs
    if p.offload_weights is False or p.num_gpus > 1 or not p.grad_ckpt:
        return None
    sp = plan_streaming(plan, host_ram_gib=p.host_ram_gib)
    if sp.verdict != "fits with streaming" or sp.streamed_layers == 0:
        return None
    change = (f"stream the base weights of {sp.streamed_layers} of {p.shape.num_hidden_layers} layers from "
              f"{sp.host_total_bytes / GIB:.1f} GiB pinned host memory" + (" (more than the host RAM!)" if sp.host_short
                                                                         else ""))
    return Suggestion(_without_graph(p, change), {"training.offload_weights": True, **_graph_off(p)}, sp.device_bytes,
                      sp.verdict)


def also_worth_it(plan: MemoryPlan) -> list[Suggestion]:
    """For a plan that fits: offloaded checkpoints when onecard's kernels would then checkpoint each layer in two
    halves (PlanInputs.split_halves), which holds less on the GPU *and* recomputes less -- measured faster on the H200
    (Llama 3 8B b8: 13,200 vs 12,906 tokens/s, bench/results/h200-k10.jsonl), at the cost of pinned host memory;
    and the layers the card has room to train without checkpoints (no recompute for them: an estimate of the speed,
    :func:`most_uncheckpointed_layers` for the memory) -- checkpointing off when every layer has room."""
    p = plan.inputs
    if not plan.fits or not p.grad_ckpt:
        return []
    k = most_uncheckpointed_layers(p) if p.offload_weights is not True else 0
    off = plan_memory(p.with_(grad_ckpt=False, offload_activations=False, uncheckpointed_layers=0))
    if k == p.shape.num_hidden_layers and off.verdict == "fits":
        change = (f"activation checkpointing off: every layer's activations fit "
                  f"({(off.total_bytes - plan.total_bytes) / GIB:.1f} GiB more; no recompute)")
        return [Suggestion(change, {"training.grad_ckpt": False, "training.offload_activations": False,
                                    "training.uncheckpointed_layers": 0}, off.total_bytes, off.verdict)]
    out = []
    offloaded = p.with_(offload_activations=True)
    if not p.offload_activations and offloaded.split_halves and not p.cuda_graph:  # it would cost the graph
        new = plan_memory(offloaded)
        saved_gib = (plan.total_bytes - new.total_bytes) / GIB
        change = (f"offload activation checkpoints to host ({saved_gib:.1f} GiB less on the GPU, "
                  f"{new.host_bytes / GIB:.1f} GiB pinned host memory; the layers are then checkpointed in halves, "
                  "which recomputes less)")
        out.append(Suggestion(change, {"training.offload_activations": True}, new.total_bytes, new.verdict))
    if k > p.uncheckpointed_layers:
        new = plan_memory(p.with_(uncheckpointed_layers=k))
        change = (f"the last {k} of {p.shape.num_hidden_layers} layers without activation checkpoints (their "
                  f"activations stay on the GPU, {(new.total_bytes - plan.total_bytes) / GIB:.1f} GiB more; backward "
                  "does not recompute them)")
        out.append(Suggestion(change, {"training.uncheckpointed_layers": k}, new.total_bytes, new.verdict))
    return out


def cheapest_reduction(plan: MemoryPlan) -> Suggestion | None:
    """The cheapest recipe change that plans less memory than ``plan``, fit or not: what to try after a run ran out
    of memory on a plan that said it fits (the planner was short by at least the difference)."""
    if not plan.fits and (fixes := [s for s in suggest_fixes(plan) if not s.set.keys() & {"plan.gpu"}]):
        return fixes[0]
    for change, overrides, trial in _candidates(plan.inputs):
        new = plan_memory(trial)
        if new.total_bytes < plan.total_bytes:
            return Suggestion(change, overrides, new.total_bytes, new.verdict)
    return None
