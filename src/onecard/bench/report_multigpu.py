"""The 'Multi-GPU (issue 9)' section of docs/benchmarks.md, from bench/results/h200x2-*.jsonl.

Those rows come from ``onecard.train.distributed_probe`` (acceptances 2 and 3) and ``notes/multigpu_parity.sh``
(acceptance 1), not from ``onecard bench``; they carry ``group: multigpu`` and no ``device`` key, so the single-GPU
tables and the calibration (which read ``device == "cuda"`` rows) never see them. Every figure below is read from
those rows or is a ratio of two of them.
"""

from __future__ import annotations

from typing import Any

SPEEDUP_TARGET = 1.8  # issue 9: 2 GPUs >= 1.8 x one GPU's tokens/s
PEAK_TOLERANCE = 0.10  # issue 9: per-GPU peak within +-10% of the planner
PARITY_TOLERANCE = 0.01  # issue 9: loss curves within 1%


def multigpu_section(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows and the acceptance verdicts they support (JSON-ready; rendered by :func:`render_multigpu`)."""
    rows = [r for r in records if r.get("group") == "multigpu"]
    probes = [{k: v for k, v in r.items() if k != "_file"} for r in rows if r["kind"] == "probe"]
    parity = [{k: v for k, v in r.items() if k not in ("_file", "losses_one_gpu", "losses_two_gpus",
                                                         "grad_norms_one_gpu", "grad_norms_two_gpus")}
              for r in rows if r["kind"] == "parity"]
    return {"probes": probes, "parity": parity, "speedup": _speedup(probes), "sharding": _sharding(probes)}


def _speedup(probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rank 0's all-GPU tokens/s at world 2 over the world-1 row of the same shape (acceptance 2)."""
    out = []
    for one in (p for p in probes if p["world"] == 1):
        same = [p for p in probes if p["world"] == 2 and p["rank"] == 0 and
                all(p[k] == one[k] for k in ("model", "method", "strategy", "seq", "batch"))]
        for two in same:
            ratio = two["tokens_per_s_all_gpus"] / one["tokens_per_s_all_gpus"]
            out.append({"model": one["model"], "method": one["method"], "strategy": two["strategy"],
                        "seq": one["seq"], "batch": one["batch"], "tokens_per_s_1gpu": one["tokens_per_s_all_gpus"],
                        "tokens_per_s_2gpus": two["tokens_per_s_all_gpus"], "ratio": ratio,
                        "peak_reserved_gib_1gpu": one["peak_reserved_gib"], "peak_reserved_gib_2gpus": two["peak_reserved_gib"],
                        "pass": ratio >= SPEEDUP_TARGET, "command": one["run_command"]})
    return out


def _sharding(probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-GPU weights and peak against the planner, FSDP rows (acceptance 3)."""
    out = []
    for p in (p for p in probes if p["strategy"] == "fsdp"):
        peak = p["peak_reserved_gib"] / p["predicted_reserved_gib"]
        out.append({"model": p["model"], "method": p["method"], "rank": p["rank"], "world": p["world"],
                    "weights_before_gib": p["weights_gib_before_wrap"], "weights_after_gib": p["weights_gib_after_wrap"],
                    "weights_fraction": p["weights_gib_after_wrap"] / p["weights_gib_before_wrap"],
                    "planned_weights_gib": p["predicted_weights_gib"], "peak_reserved_gib": p["peak_reserved_gib"],
                    "peak_allocated_gib": p["peak_allocated_gib"], "planned_reserved_gib": p["predicted_reserved_gib"],
                    "reserved_vs_plan": peak,
                    "allocated_vs_plan": p["peak_allocated_gib"] / p["predicted_reserved_gib"],
                    "peak_pass": abs(peak - 1) <= PEAK_TOLERANCE, "s_per_step": p["s_per_step"],
                    "alloc_conf": p.get("alloc_conf") or "default", "command": p["run_command"]})
    return out


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def render_multigpu(section: dict[str, Any]) -> str:
    if not (section["probes"] or section["parity"]):
        return ""
    v = (section["probes"] or section["parity"])[0]
    versions = ", ".join(f"{k} {val}" for k, val in v["versions"].items())
    out = [f"""
## Multi-GPU (issue 9) - measured, {v['host']}

Measured on {v['date']} ({versions}: the GPU image's versions as reported, not printed by
these runs) with the commands of `notes/multigpu.md`; raw rows in
`bench/results/h200x2-multigpu.jsonl`. Probe rows (`python -m onecard.train.distributed_probe`): random weights
wrapped exactly as `onecard train --num-gpus N` wraps them, random tokens, real optimizer steps; tokens/s is over all
GPUs from the median step after the first; peaks are each rank's `max_memory_reserved` / `max_memory_allocated`
over the steps (reset after wrapping).
Parity rows: `notes/multigpu_parity.sh`, the same small recipe through `onecard train` on 1 GPU (micro-batch 4 x
accum 2) and 2 GPUs (2 x 2 each, the same global batch), largest relative difference of the per-step losses.
"""]
    out.append("### Loss curves, 1 GPU vs 2 GPUs (target: within 1%)\n")
    out.append(_table(["strategy", "kernels", "steps", "max rel. loss diff", "first loss (1 / 2 GPUs)",
                       "last loss (1 / 2 GPUs)", "result", "command"],
                      [[r["strategy"], r["kernels"], str(r["steps"][0]), _f(r["max_rel_loss_diff"], ".2e"),
                        f"{r['first'][0]:.4f} / {r['first'][1]:.4f}", f"{r['last'][0]:.4f} / {r['last'][1]:.4f}",
                        r["status"] + (f": {r['note']}" if r.get("note") else ""), f"`{r['run_command']}`"]
                       for r in section["parity"]]))
    out.append(f"### Tokens/s, 1 GPU vs 2 GPUs (target: >= {SPEEDUP_TARGET}x)\n")
    out.append(_table(["model", "method", "strategy", "seq x batch per GPU", "tokens/s 1 GPU", "tokens/s 2 GPUs",
                       "ratio", "peak reserved GiB per GPU (1 / 2 GPUs)", "result", "command"],
                      [[r["model"], r["method"], r["strategy"], f"{r['seq']} x {r['batch']}",
                        _f(r["tokens_per_s_1gpu"], ",.0f"), _f(r["tokens_per_s_2gpus"], ",.0f"),
                        _f(r["ratio"], ".3f") + "x",
                        f"{r['peak_reserved_gib_1gpu']:.2f} / {r['peak_reserved_gib_2gpus']:.2f}",
                        "pass" if r["pass"] else "fail", f"`{r['command']}`"]
                       for r in section["speedup"]]))
    out.append("### Sharded QLoRA, per GPU (targets: weights ~ half; peak within +-10% of the planner)\n")
    out.append(_table(["model", "rank", "weights GiB before / after wrap", "planned weights GiB",
                       "peak reserved GiB", "peak allocated GiB", "planned GiB (allocator)", "reserved / plan",
                       "allocated / plan", "allocator", "s per step", "result (peak)"],
                      [[f"{r['model']} {r['method']}", f"{r['rank']} of {r['world']}",
                        f"{r['weights_before_gib']:.2f} / {r['weights_after_gib']:.2f}",
                        _f(r["planned_weights_gib"], ".2f"), _f(r["peak_reserved_gib"], ".2f"),
                        _f(r["peak_allocated_gib"], ".2f"), _f(r["planned_reserved_gib"], ".2f"),
                        _f(r["reserved_vs_plan"], ".3f"), _f(r["allocated_vs_plan"], ".3f"), str(r["alloc_conf"]),
                        ", ".join(f"{s:.2f}" for s in r["s_per_step"]),
                        "within +-10%" if r["peak_pass"] else "outside +-10%"] for r in section["sharding"]]))
    if section["sharding"]:
        out.append(f"Command: `{section['sharding'][0]['command']}`\n")
    out.append(_caveats())
    return "\n".join(out)


def _caveats() -> str:
    return """
Caveats: the 20-step FSDP parity failure was measured before the fix of gradient clipping under FSDP (each rank
clipped by its own shard's norm; `Dist.clip_grad_norm_` now uses the FSDP root's all-rank norm); the 50-step rerun
after the fix passes. The sharded QLoRA peak is reserved memory: the allocated peak is within 1% of the plan; the gap
between them is memory the caching allocator holds unused (fragmentation, presumably from FSDP's all-gathers; not
confirmed). Expandable segments made it larger (35.55 against 32.96 GiB), so workers keep the default allocator;
acceptance 3's +-10% on reserved memory is not met (1.108). The DDP probe rows' own `peak_vs_plan` field compared
them with the planner's FSDP split (its `num_gpus` divides the weights); a DDP rank replicates the model, so its peak
belongs beside the one-GPU plan, as in the table above. Every rank loads the whole model before FSDP shards it (not
in the peaks above).
"""
