"""The 'Multi-GPU' section of docs/benchmarks.md, from bench/results/h200x2-*.jsonl.

Those rows come from ``onecard.bench.distributed_probe`` (speed and memory) and from the parity and resume checks
(now tests/test_multigpu_gpu.py; the rows were written by their former shell scripts), not from ``onecard bench``;
they carry ``group: multigpu`` and no ``device`` key, so the single-GPU tables and the calibration (which read
``device == "cuda"`` rows) never see them. Every figure below is read from those rows, is a ratio of two of them, or
is the *current* planner's figure for a row's recipe: acceptance 3 is judged against the planner as it is now (a
row's own ``predicted_reserved_gib`` is the planner of the day it ran, shown beside it), so a planner change is
checked against every measurement already taken. Pure: no torch import.
"""

from __future__ import annotations

import re
from typing import Any

from onecard.bench.report_md import fmt, table

SPEEDUP_TARGET = 1.8  # the multi-GPU target: 2 GPUs >= 1.8 x one GPU's tokens/s
PEAK_TOLERANCE = 0.10  # per-GPU peak within +-10% of the planner
PARITY_TOLERANCE = 0.01  # loss curves within 1%
HALF_TOLERANCE = 0.05  # "per-GPU weight bytes ~ half": after/before wrap within 1/N +- this
PROBE_LORA_RANK = 16  # distributed_probe's --rank default (rows before 'lora_rank' was recorded never passed it)
GIB = 2**30
_BULKY = ("_file", "memory_snapshot", "memory_snapshot_gib", "memory_snapshot_at_peak", "allocator_stats")


def multigpu_section(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows and the acceptance verdicts they support (JSON-ready; rendered by :func:`render_multigpu`)."""
    rows = [r for r in records if r.get("group") == "multigpu"]
    full_probes = [r for r in rows if r["kind"] == "probe"]
    probes = [{k: v for k, v in r.items() if k not in _BULKY} for r in full_probes]
    parity = [{k: v for k, v in r.items() if k not in ("_file", "losses_one_gpu", "losses_two_gpus",
                                                         "grad_norms_one_gpu", "grad_norms_two_gpus")}
              for r in rows if r["kind"] == "parity"]
    resume = [{k: v for k, v in r.items() if k not in ("_file", "metric_steps")} for r in rows if r["kind"] == "resume"]
    sharding = _sharding(full_probes)
    return {"probes": probes, "parity": parity, "speedup": _speedup(probes), "sharding": sharding,
            "acceptance3": acceptance3(sharding), "snapshots": _snapshots(full_probes), "resume": resume}


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


def lora_rank(row: dict[str, Any]) -> int:
    """The adapter rank a probe row trained: recorded in the row where it has the field, else its command's --rank, else the
    probe's default (the row's own ``rank`` is the process rank)."""
    if row.get("lora_rank"):
        return int(row["lora_rank"])
    found = re.search(r"--rank[ =](\d+)", row.get("command", ""))
    return int(found.group(1)) if found else PROBE_LORA_RANK


def planned_now(row: dict[str, Any]) -> dict[str, Any]:
    """The current planner's per-GPU figures for a probe row: the recipe the probe built
    (distributed_probe.probe_recipe) through the probe's own prediction (FSDP: num_gpus = world; DDP: one GPU)."""
    from onecard.bench.distributed_probe import plan_prediction, probe_recipe

    _, recipe = probe_recipe(row["model"], row["method"], row["seq"], row["batch"], lora_rank(row), row["world"])
    return plan_prediction(recipe, row["strategy"])


def variant(row: dict[str, Any]) -> str:
    """FSDP settings variant and allocator setting; 'default' is what `onecard train --num-gpus N` runs."""
    parts = [] if row.get("variant", "default") == "default" else [row["variant"]]
    parts += [f"{k}={v}" for k, v in sorted((row.get("alloc_conf") or {}).items())]
    return "+".join(parts) or "default"


def _sharding(probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-GPU weights and peak against the planner now (and as recorded at run time), FSDP rows (acceptance 3)."""
    out = []
    for p in (p for p in probes if p["strategy"] == "fsdp"):
        now = planned_now(p)
        ratio = p["peak_reserved_gib"] / now["predicted_reserved_gib"]
        fraction = p["weights_gib_after_wrap"] / p["weights_gib_before_wrap"]
        out.append({"model": p["model"], "method": p["method"], "seq": p["seq"], "batch": p["batch"],
                    "rank": p["rank"], "world": p["world"], "acceptance": p.get("acceptance"),
                    "variant": variant(p), "date": p["date"], "raw_file": p.get("raw_file"),
                    "weights_before_gib": p["weights_gib_before_wrap"],
                    "weights_after_gib": p["weights_gib_after_wrap"],
                    "weights_fraction": fraction, "weights_sharded": abs(fraction - 1 / p["world"]) <= HALF_TOLERANCE,
                    "planned_weights_gib": now["predicted_weights_gib"],
                    "peak_reserved_gib": p["peak_reserved_gib"], "peak_allocated_gib": p["peak_allocated_gib"],
                    "planned_reserved_gib_at_run": p["predicted_reserved_gib"],
                    "reserved_vs_plan_at_run": p["peak_reserved_gib"] / p["predicted_reserved_gib"],
                    "planned_reserved_gib": now["predicted_reserved_gib"], "reserved_vs_plan": ratio,
                    "allocated_vs_plan": p["peak_allocated_gib"] / now["predicted_reserved_gib"],
                    "peak_pass": abs(ratio - 1) <= PEAK_TOLERANCE, "s_per_step": p["s_per_step"],
                    "command": p["run_command"] + (f" (part {p['session_part']}: {p['part_command']})"
                                                   if p.get("part_command") else "")})
    return out


def acceptance3(sharding: list[dict[str, Any]]) -> dict[str, Any]:
    """Acceptance 3 on the default-settings 70B rows (acceptance 'A3', variant 'default'); the held-out shape and
    the variants are reported beside it, not judged."""
    judged = [s for s in sharding if s["acceptance"] == "A3" and s["variant"] == "default"]
    held = [s for s in sharding if s["acceptance"] == "A3-heldout" and s["variant"] == "default"]

    def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
        ratios = [s["reserved_vs_plan"] for s in rows]
        return {"rows": len(rows), "reserved_vs_plan_min": min(ratios, default=None),
                "reserved_vs_plan_max": max(ratios, default=None),
                "weights_sharded": bool(rows) and all(s["weights_sharded"] for s in rows),
                "peak_pass": bool(rows) and all(s["peak_pass"] for s in rows),
                "pass": bool(rows) and all(s["peak_pass"] and s["weights_sharded"] for s in rows)}

    return {"default": verdict(judged), "heldout": verdict(held)}


def _snapshots(probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-stream end-of-steps allocator summary (distributed_probe --memory-snapshot): stream '0' is the default
    (compute) stream; the others are side streams (FSDP's), named by their id."""
    out = []
    for p in (p for p in probes if p.get("memory_snapshot")):
        streams = p["memory_snapshot"]["streams"]
        for sid, s in sorted(streams.items(), key=lambda kv: -kv[1]["reserved_bytes"]):
            out.append({"model": p["model"], "method": p["method"], "variant": variant(p), "rank": p["rank"],
                        "stream": "default" if sid == "0" else f"side {sid}",
                        "reserved_gib": s["reserved_bytes"] / GIB, "allocated_gib": s["allocated_bytes"] / GIB,
                        "inactive_gib": s["inactive_bytes"] / GIB, "idle_segment_gib": s["idle_segment_bytes"] / GIB,
                        "largest_segment_gib": s["largest_segment_bytes"] / GIB,
                        "peak_sample": (p.get("memory_snapshot_at_peak") or {}).get("where")})
    return out




def render_multigpu(section: dict[str, Any]) -> str:
    if not (section["probes"] or section["parity"]):
        return ""
    v = (section["probes"] or section["parity"])[0]
    versions = ", ".join(f"{k} {val}" for k, val in v["versions"].items())
    out = [f"""
## Multi-GPU - measured, {v['host']}

Measured on {v['date']} ({versions}: the GPU image's versions as reported; rows from the third session record
their own) with the commands of `notes/multigpu.md`; raw rows in
`bench/results/h200x2-multigpu.jsonl`. Probe rows (`python -m onecard.train.distributed_probe`): random weights
wrapped exactly as `onecard train --num-gpus N` wraps them, random tokens, real optimizer steps; tokens/s is over all
GPUs from the median step after the first; peaks are each rank's `max_memory_reserved` / `max_memory_allocated`
over the steps (reset after wrapping).
Parity rows: `notes/multigpu_parity.sh`, the same small recipe through `onecard train` on 1 GPU (micro-batch 4 x
accum 2) and 2 GPUs (2 x 2 each, the same global batch), largest relative difference of the per-step losses.
"""]
    out.append("### Loss curves, 1 GPU vs 2 GPUs (target: within 1%)\n")
    out.append(table(["strategy", "kernels", "steps", "max rel. loss diff", "first loss (1 / 2 GPUs)",
                       "last loss (1 / 2 GPUs)", "result", "command"],
                      [[r["strategy"], r["kernels"], str(r["steps"][0]), fmt(r["max_rel_loss_diff"], ".2e"),
                        f"{r['first'][0]:.4f} / {r['first'][1]:.4f}", f"{r['last'][0]:.4f} / {r['last'][1]:.4f}",
                        r["status"] + (f": {r['note']}" if r.get("note") else ""), f"`{r['run_command']}`"]
                       for r in section["parity"]]))
    out.append(f"### Tokens/s, 1 GPU vs 2 GPUs (target: >= {SPEEDUP_TARGET}x)\n")
    out.append(table(["model", "method", "strategy", "seq x batch per GPU", "tokens/s 1 GPU", "tokens/s 2 GPUs",
                       "ratio", "peak reserved GiB per GPU (1 / 2 GPUs)", "result", "command"],
                      [[r["model"], r["method"], r["strategy"], f"{r['seq']} x {r['batch']}",
                        fmt(r["tokens_per_s_1gpu"], ",.0f"), fmt(r["tokens_per_s_2gpus"], ",.0f"),
                        fmt(r["ratio"], ".3f") + "x",
                        f"{r['peak_reserved_gib_1gpu']:.2f} / {r['peak_reserved_gib_2gpus']:.2f}",
                        "pass" if r["pass"] else "fail", f"`{r['command']}`"]
                       for r in section["speedup"]]))
    out += [_render_sharding(section), _render_snapshots(section["snapshots"]), _render_resume(section["resume"]),
            _caveats(section["sharding"])]
    return "\n".join(out)


def _render_sharding(section: dict[str, Any]) -> str:
    a3 = section["acceptance3"]
    rows = [[f"{r['model']} {r['method']} {r['seq']} x {r['batch']}", r["acceptance"] or "-", r["variant"],
             f"{r['rank']} of {r['world']}", f"{r['weights_before_gib']:.2f} / {r['weights_after_gib']:.2f}",
             fmt(r["planned_weights_gib"], ".2f"), fmt(r["peak_reserved_gib"], ".2f"), fmt(r["peak_allocated_gib"], ".2f"),
             f"{r['planned_reserved_gib_at_run']:.2f} ({r['reserved_vs_plan_at_run']:.3f})",
             fmt(r["planned_reserved_gib"], ".2f"), fmt(r["reserved_vs_plan"], ".3f"), fmt(r["allocated_vs_plan"], ".3f"),
             ", ".join(f"{s:.2f}" for s in r["s_per_step"]),
             ("within +-10%" if r["peak_pass"] else "outside +-10%") + _judged(r)] for r in section["sharding"]]
    d, h = a3["default"], a3["heldout"]
    lines = ["### Sharded training, per GPU (targets: weights ~ half; peak within +-10% of the planner)\n",
             "Planned GiB are the planner's allocator figure (`onecard plan --num-gpus 2`) for the probe's recipe: "
             "'at run' as recorded in the row, 'now' recomputed by the current planner (the ratios judged).\n",
             table(["shape", "acceptance", "variant", "rank", "weights GiB before / after wrap",
                     "planned weights GiB (now)", "peak reserved GiB", "peak allocated GiB",
                     "planned GiB at run (reserved / plan)", "planned GiB now", "reserved / plan now",
                     "allocated / plan now", "s per step", "result (peak, now)"], rows)]
    if d["rows"]:
        sharded = "sharded" if d["weights_sharded"] else "NOT sharded"
        lines.append(f"Acceptance 3 (default settings, 70B rows): weights {sharded}; "
                     f"reserved / plan now {_span(d)} -> **{'pass' if d['pass'] else 'fail'}**.")
    if h["rows"]:
        lines.append(f"Held-out shape (default settings): reserved / plan now {_span(h)} "
                     f"({'within' if h['peak_pass'] else 'outside'} +-10%).")
    commands = sorted({r["command"] for r in section["sharding"]})
    lines.append("\nCommands:\n" + "\n".join(f"- `{c}`" for c in commands) + "\n")
    return "\n".join(lines)


def _span(v: dict[str, Any]) -> str:
    lo, hi = f"{v['reserved_vs_plan_min']:.3f}", f"{v['reserved_vs_plan_max']:.3f}"
    return lo if lo == hi else f"{lo}-{hi}"


def _judged(r: dict[str, Any]) -> str:
    if r["variant"] != "default":
        return " (variant, not judged)"
    return "" if r["acceptance"] == "A3" else " (held-out shape)"


def _render_snapshots(snaps: list[dict[str, Any]]) -> str:
    if not snaps:
        return ""
    return ("### Where reserved memory sits (allocator snapshot per stream, end of the steps)\n\n" + table(
        ["shape", "variant", "rank", "stream", "reserved GiB", "allocated GiB", "inactive GiB", "idle segments GiB",
         "largest segment GiB", "peak sample"],
        [[f"{s['model']} {s['method']}", s["variant"], str(s["rank"]), s["stream"], f"{s['reserved_gib']:.3f}",
          f"{s['allocated_gib']:.3f}", f"{s['inactive_gib']:.3f}", f"{s['idle_segment_gib']:.3f}",
          f"{s['largest_segment_gib']:.3f}", s["peak_sample"] or "-"] for s in snaps]))


def _render_resume(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    return ("### Checkpoint / resume on 2 GPUs (killed after a checkpoint, resumed; compared with an uninterrupted run)"
            "\n\n" + table(
                ["strategy", "steps", "killed at", "max rel. loss diff after resume",
                 "adapter tensors (full / resumed)",
                 "adapter max abs diff", "result", "command"],
                [[r["strategy"], str(r["steps"]), str(r["crash_at"]), fmt(r["max_rel_loss_diff_after_resume"], ".2e"),
                  " / ".join(str(k) for k in r["adapter_keys"]), fmt(r["adapter_max_abs_diff"], ".2e"),
                  r["status"] + (f": {r['note']}" if r.get("note") else ""),
                  f"`{r['run_command']}` ({r['part_command']})"] for r in rows]))


def _caveats(sharding: list[dict[str, Any]]) -> str:
    alloc = [r["allocated_vs_plan"] for r in sharding if r["variant"] == "default"] or [float("nan")]
    return f"""
Caveats: reserved memory above allocated under FSDP1 is mostly FSDP's all-gather side stream: it gathers the root
unit (embeddings, untied LM head, final norm: 3.92 GiB on Llama 3 70B) at full size, frees it before the backward
peak, and the block stays cached in that stream's pool, which the compute stream cannot reuse (snapshot table above:
4.72 GiB reserved, 0 allocated). The planner now counts it (`fsdp_gather_cache`: the root unit's bf16 bytes); the rest
of that stream (two layer units) is not a separate term. The plan is a reserved-memory figure: with that term the
allocated peak sits at {min(alloc):.2f}-{max(alloc):.2f} of it (default rows). The term was derived from the 70B
snapshot and checked on the 8B LoRA probe, which ran in the same session: a second shape, not a blind prediction.
`limit_all_gathers` off and `expandable_segments` both raised reserved memory (rows marked by variant; not judged).
The 20-step FSDP parity failure predates the fix of gradient clipping under FSDP; the 50-step rerun passes. The first
FSDP resume run saved empty adapters (peft 0.21 matched no keys under nested FSDP units); after the fix
(`train/fsdp_save.py`) losses and adapters after a resume equal the uninterrupted run's. The DDP probe rows' own
`peak_vs_plan` field compared them with the planner's FSDP split; a DDP rank replicates the model, so its peak
belongs beside the one-GPU plan. Every rank loads the whole model before FSDP shards it (not in the peaks above).
"""
