"""docs/benchmarks.md and docs/benchmarks.json from the committed measurements (``python -m onecard.bench.report``,
from the checkout's root; ``--results DIR`` and ``--docs DIR`` point elsewhere).

Every number in the measured tables is read from bench/results/*.jsonl; the RTX 4090 rows are the planner's
calibrated estimates (labelled so), computed here with the shipped calibration profile.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onecard.bench.calibrate import RESULTS_DIR, kbit_upcast, load_records, superseded, superseded_reason

DOCS = Path("docs")
EPOCH_SAMPLES = 50_000
GIB = 2**30


def epoch_hours(tokens_per_s: float | None, seq: int) -> float | None:
    """Hours for 50k samples of ``seq`` tokens each (packed: every sample a full sequence)."""
    return None if not tokens_per_s else EPOCH_SAMPLES * seq / tokens_per_s / 3600


def _recipe(rec: dict[str, Any], kernels: str) -> str:
    rank = f" r{rec['rank']}" if rec["method"] != "full" else ""
    offloaded = rec.get("offload_activations") and kernels != "none"  # the baseline half never offloads
    ck = ("ckpt, offloaded to host" if offloaded else "ckpt") if rec["grad_ckpt"] else "no ckpt"
    if rec.get("uncheckpointed_layers"):
        ck += f" but the last {rec['uncheckpointed_layers']} layers"
    extra = (", fp8 base" if rec.get("quant_base") == "fp8" else "") + (
        f", streamed weights ({rec.get('resident_layers', 0)} resident)" if rec.get("offload_weights") else "") + (
        f", cap {rec['memory_cap_gib']:g} GiB" if rec.get("memory_cap_gib") else "") + (
        ", CUDA graph" if rec.get("cuda_graph") and kernels != "none" else "")
    return f"{rec['method']}{rank}, {ck}, kernels {kernels}{extra}"


def measured_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        if rec.get("device") != "cuda" or rec.get("group") == "validate":
            continue
        runs = [("", rec.get("kernels_applied") or "none", "onecard")]
        if rec.get("baseline"):
            runs.append(("baseline_", "none", "transformers + peft"))
        for prefix, kernels, path in runs:
            ok = rec.get(f"{prefix}status") == "ok"
            tps = rec.get(f"{prefix}tokens_per_s") if ok else None
            rows.append({"group": rec["group"], "path": path, "recipe": _recipe(rec, kernels) + (
                             f" (superseded: {superseded_reason(rec, prefix)})" if superseded(rec, prefix) else ""), "model": rec["model"],
                         "method": rec["method"], "seq": rec["seq"], "batch": rec["micro_batch"],
                         "rank": rec["rank"], "grad_ckpt": rec["grad_ckpt"], "kernels": kernels,
                         "offload_activations": bool(rec.get("offload_activations")) and not prefix,
                         "offload_weights": bool(rec.get("offload_weights")), "resident_layers": rec.get("resident_layers", 0),
                         "quant_base": rec.get("quant_base", "none"),
                         "uncheckpointed_layers": rec.get("uncheckpointed_layers", 0),
                         "cuda_graph": bool(rec.get("cuda_graph")) and not prefix,
                         "status": rec.get(f"{prefix}status"), "tokens_per_s": tps,
                         "hours_per_50k_epoch": epoch_hours(tps, rec["seq"]),
                         "peak_reserved_gib": rec.get(f"{prefix}peak_reserved_gib"),
                         "peak_allocated_gib": rec.get(f"{prefix}peak_allocated_gib"),
                         "memory_cap_gib": rec.get("memory_cap_gib"), "mfu": rec.get("mfu") if not prefix else None,
                         "kbit_upcast": kbit_upcast(rec, prefix), "superseded": superseded(rec, prefix),
                         "label": "measured" + (f" (superseded: {superseded_reason(rec, prefix)}, no longer what onecard "
                                                "runs)" if superseded(rec, prefix) else ""), "date": rec["date"],
                         "command": rec["config_command"] + ("" if not prefix else "  (baseline half)")})
    return rows


def rtx4090_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The planner's calibrated estimates on an RTX 4090 for the seed throughput workloads (onecard kernels)."""
    from onecard.bench.config import BenchConfig
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import plan_memory
    from onecard.plan.speed import estimate_throughput

    rows = []
    seen = set()
    for rec in records:
        if rec.get("group") != "throughput":
            continue
        for batch in sorted({1, rec["micro_batch"]}):
            key = (rec["model"], rec["method"], rec["seq"], batch)
            if key in seen:
                continue
            seen.add(key)
            cfg = BenchConfig(model=rec["model"], method=rec["method"], seq=rec["seq"], micro_batch=batch,
                              rank=rec["rank"], grad_ckpt=rec["grad_ckpt"], kernels="onecard", gpu="rtx4090")
            inp = inputs_from_recipe(cfg.to_recipe(), gpu="rtx4090")
            plan = plan_memory(inp)
            tps = estimate_throughput(inp, memory_plan=plan)
            rows.append({"recipe": _recipe(rec, "onecard"), "model": rec["model"], "seq": rec["seq"], "batch": batch,
                         "tokens_per_s": tps.estimate_tokens_per_s, "speed_label": tps.label,
                         "hours_per_50k_epoch": epoch_hours(tps.estimate_tokens_per_s, rec["seq"]),
                         "peak_gib": plan.required_bytes / GIB, "verdict": plan.verdict,
                         "label": "calibrated estimate (RTX 4090, not measured)",
                         "speed_source": tps.efficiency_source,
                         "command": f"onecard plan --model {rec['model']} --method {rec['method']} --seq {rec['seq']} "
                                    f"--batch {batch} --rank {rec['rank']} --kernels onecard --gpu rtx4090"})
    return rows


def claims(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r.get("name") or r["label"]: r for r in records if r.get("device") == "cuda"}

    def find(**kw):  # the latest measurement of a configuration onecard still runs
        return [r for r in records if r.get("status") == "ok" and not superseded(r)
                and all(r.get(k) == v for k, v in kw.items())][-1]

    r16, r64 = by["claim-lora-r16"], by["claim-lora-r64"]
    dora, qlora = by["claim-dora-r16"], by["claim-qlora-r16"]
    out = [
        {"claim": "rank 64 runs at ~70% of rank 16's speed", "measured": r64["tokens_per_s"] / r16["tokens_per_s"],
         "what": "speed ratio r64/r16 (Llama 3 8B LoRA, seq 2048 x 8, ckpt, kernels none)"},
        {"claim": "DoRA ~10% more memory than LoRA", "measured": dora["peak_reserved_gib"] / r16["peak_reserved_gib"],
         "what": "peak reserved ratio DoRA/LoRA (same shape)"},
        {"claim": "DoRA ~10% slower than LoRA", "measured": dora["tokens_per_s"] / r16["tokens_per_s"],
         "what": "speed ratio DoRA/LoRA"},
        {"claim": "QLoRA ~80% of LoRA's speed", "measured": qlora["tokens_per_s"] / r16["tokens_per_s"],
         "what": "speed ratio QLoRA/LoRA (kernels none)"},
    ]
    def seed_b8(method):  # the seed shape on onecard's current kernels (suite part K re-measures it)
        return [r for r in records if r.get("status") == "ok" and not superseded(r)
                and r.get("group") in ("throughput", "kernels") and r.get("model") == "llama-3-8b"
                and r.get("method") == method and r.get("micro_batch") == 8 and r.get("seq") == 2048
                and r.get("kernels_applied") == "onecard" and not r.get("offload_activations")
                and not r.get("memory_cap_gib")][-1]

    t_lora, t_qlora = seed_b8("lora"), seed_b8("qlora")
    out.append({"claim": "QLoRA ~80% of LoRA's speed", "measured": t_qlora["tokens_per_s"] / t_lora["tokens_per_s"],
                "what": "speed ratio QLoRA/LoRA (onecard kernels, seq 2048 x 8)"})
    for seq, mb in ((2048, 4), (4096, 1)):
        on = find(group="matrix", model="llama-3-8b", method="lora", seq=seq, micro_batch=mb, grad_ckpt=True,
                  kernels_applied="none")
        off = find(group="matrix", model="llama-3-8b", method="lora", seq=seq, micro_batch=mb, grad_ckpt=False)
        out.append({"claim": "gradient checkpointing costs ~15% speed", "measured": 1 - on["tokens_per_s"] / off["tokens_per_s"],
                    "what": f"speed lost with checkpointing (8B LoRA, seq {seq} x {mb})"})
        out.append({"claim": "gradient checkpointing saves 4-6 GB above seq 1024",
                    "measured": off["peak_reserved_gib"] - on["peak_reserved_gib"],
                    "what": f"GiB of peak reserved saved (8B LoRA, seq {seq} x {mb})"})
    return out


def add_planned(rows: list[dict[str, Any]]) -> None:
    """The planner's peak (allocator figure, logits freed before backward as in the bench) beside each row, and for
    the streamed and FP8 rows and their pairs its tokens/s too, with today's calibration profile."""
    import dataclasses

    from onecard.bench.config import BenchConfig
    from onecard.bench.predict import speed, streamed_off_card_bytes
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import plan_memory

    for row in rows:
        cfg = BenchConfig(model=row["model"], method=row["method"], seq=row["seq"], micro_batch=row["batch"],
                          rank=row["rank"], grad_ckpt=row["grad_ckpt"], kernels=row["kernels"], gpu="h200",
                          offload_activations=row.get("offload_activations", False),
                          offload_weights=row.get("offload_weights", False), resident_layers=row.get("resident_layers", 0),
                          quant_base=row.get("quant_base", "none"),
                          uncheckpointed_layers=row.get("uncheckpointed_layers", 0), cuda_graph=row["cuda_graph"])
        inp = dataclasses.replace(inputs_from_recipe(cfg.to_recipe(), gpu="h200"), hold_logits=False,
                                  kbit_upcast=row.get("kbit_upcast", False))
        plan = plan_memory(inp)
        row["planned_reserved_gib"] = (plan.allocator_bytes - streamed_off_card_bytes(plan, cfg)) / GIB
        m = row.get("peak_reserved_gib")
        row["planned_error_pct"] = 100 * (row["planned_reserved_gib"] - m) / m if m and row["status"] == "ok" else None
        if row["group"] in ("stream", "fp8"):  # their targets hold the planner's speed to these rows as well
            tps = row["tokens_per_s"]
            row["planned_tokens_per_s"] = speed(cfg)["predicted_tokens_per_s"]
            row["planned_speed_error_pct"] = 100 * (row["planned_tokens_per_s"] - tps) / tps if tps else None


def probe_results(results_dir: Path = RESULTS_DIR) -> list[dict]:
    """The ``onecard plan --probe`` results kept in bench/results/e2e/probe_*.json, with their file names."""
    files = sorted((Path(results_dir) / "e2e").glob("probe_*.json"))
    return [json.loads(f.read_text()) | {"_file": f"e2e/{f.name}"} for f in files]


def kernel_probes(results_dir: Path = RESULTS_DIR) -> list[dict]:
    """The probes of a card with room (the kernels section's target); streamed ones have their own section."""
    from onecard.bench.report_extra import streamed_probe

    return [p for p in probe_results(results_dir) if not streamed_probe(p)]


def main(argv: list[str] | None = None) -> None:
    import argparse

    from onecard.bench.report_kernels import kernels_section, render_kernels
    from onecard.bench.report_multigpu import multigpu_section, render_multigpu

    parser = argparse.ArgumentParser(prog="python -m onecard.bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="bench results directory")
    parser.add_argument("--docs", type=Path, default=DOCS, help="where benchmarks.md and benchmarks.json go")
    args = parser.parse_args(argv)
    records = load_records(results_dir=args.results)
    measured = measured_rows(records)
    add_planned(measured)
    payload = {"versions": next(r["versions"] for r in records if r.get("device") == "cuda"),
               "dates": sorted({r["date"][:10] for r in records if r.get("date")}),
               "epoch_samples": EPOCH_SAMPLES, "measured": measured, "rtx4090": rtx4090_rows(records),
               "claims": claims(records), "multigpu": multigpu_section(records),
               "kernels": kernels_section(records, probes=kernel_probes(args.results))}
    (args.docs / "benchmarks.json").write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    from onecard.bench.report_md import render

    from onecard.bench.report_extra import render_extra

    (args.docs / "benchmarks.md").write_text(render(payload) + render_kernels(payload["kernels"])
                                        + render_multigpu(payload["multigpu"]) + render_extra(args.results),
                                        encoding="utf-8")
    print(f"wrote {args.docs / 'benchmarks.md'} and benchmarks.json ({len(measured)} measured rows)")


if __name__ == "__main__":
    main()
