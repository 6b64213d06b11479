"""Turn bench JSON lines into calibration rows for the planner, with a named held-out set.

The speed planner (onecard.plan.speed) derives a matmul efficiency per GPU / method / kernels from measured rows
in ``onecard/calibration/measurements.json``. This module writes our H200 rows there in that file's schema, but
only the *calibration* subset: about a third of the measured configurations (every third row of each
method-and-kernels group, so each held-out row keeps a calibrated sibling) go to ``held_out`` instead, which the
loader does not read, so the planner never sees them and tests/test_bench_calibration.py checks it on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

# The checkout's committed measurements, relative to the working directory: the tools that read them regenerate the
# checkout's docs and calibration and run from its root. The installed package holds no results of its own.
RESULTS_DIR = Path("bench") / "results"
PROFILE_KEYS = ("gpu", "model", "method", "rank", "seq_len", "micro_batch", "grad_ckpt", "kernels")


def load_records(paths: Iterable[str | Path] | None = None, *, results_dir: str | Path = RESULTS_DIR
                 ) -> list[dict[str, Any]]:
    """All JSON lines of ``paths`` (default: ``results_dir``/*.jsonl), in file order."""
    if not paths and not Path(results_dir).is_dir():
        raise FileNotFoundError(f"no bench results directory at {Path(results_dir).resolve()}: run from the onecard "
                                "checkout's root, or pass the directory")
    files = sorted(Path(p) for p in paths) if paths else sorted(Path(results_dir).glob("*.jsonl"))
    out = []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                rec["_file"] = f.name
                out.append(rec)
    return out


def kbit_upcast(rec: dict[str, Any], prefix: str = "") -> bool:
    """Did this half of a record run QLoRA with peft's fp32 upcast of the non-quantised parameters? Records from
    before the field existed (2026-11-28 first H200 runs) all did."""
    return rec.get("method") == "qlora" and bool(rec.get(f"{prefix}kbit_upcast", True))


# The first H200 run with onecard's current kernel set (bench/results/h200-k2.jsonl): the fused LoRA q/k/v/o
# projections, the MLP's down projection skipped in the checkpoint's recompute, the in-place GLU backward and DoRA
# through the fused ops. onecard-kernel rows measured before it timed code onecard no longer runs.
KERNELS_SINCE = "2026-11-28T17:19"
# Offloaded checkpoints whose prefetch buffer is allocated on the compute stream (patch/offload.py _copy_back);
# the run before (h200-k2.jsonl) allocated it on the side stream, which left 3.5 GiB reserved but unused.
OFFLOAD_SINCE = "2026-11-28T17:24"
# onecard's DoRA as LoRA on row-scaled weights, with the down projection's output kept for the recompute skip
# (kernels/lora_linear.py dora_weights, kernels/lora_mlp.py): 4 GiB more on Llama 3 8B at 16k tokens than before.
DORA_SINCE = "2026-11-28T18:37"
# Run K7 (h200-k7.jsonl) measured the fused loss with >= 2048-row chunks, reverted after it (0.6 GiB more at the peak
# for ~2 ms per step, bench/results/ce_chunk_2026-11-28.json): its onecard rows describe code onecard no longer runs.
CE_CHUNK_EXPERIMENT = ("2026-11-28T18:56", "2026-11-28T19:01")
# Offloaded checkpoints of onecard-patched layers split into attention and MLP halves (patch/blocks.py), with copied
# sources freed in compute-stream order (patch/offload.py); run K9 had the split with record_stream (5.4 GiB reserved
# and unused), run K10 (h200-k10.jsonl) the final code.
SPLIT_OFFLOAD_SINCE = "2026-11-28T20:35"
# FP8 GEMMs that add into their output (kernels/cublaslt.py) with fast accumulation in forward, from run F19e
# (h200-f19e.jsonl); runs F19c/F19d (h200-f19c/d.jsonl, the same morning) added each LoRA output in a second pass.
FP8_ACCUMULATING_SINCE = "2026-12-03T10:00"


def superseded_reason(rec: dict[str, Any], prefix: str = "") -> str | None:
    """Why the onecard half of a record no longer describes what onecard runs, or None. Kept in the raw results,
    such rows are left out of calibration and of the planner checks. Plain transformers + peft halves stay valid.

    - fp32-upcast QLoRA: train/model.py prepare_kbit casts back to bf16 since the second H200 run (h200-r2.jsonl);
    - older kernels: measured before :data:`KERNELS_SINCE`; offloaded checkpoints before :data:`OFFLOAD_SINCE`;
      onecard DoRA before :data:`DORA_SINCE`; the reverted fused-loss chunking of :data:`CE_CHUNK_EXPERIMENT`;
      onecard's offloaded checkpoints before :data:`SPLIT_OFFLOAD_SINCE`; an FP8 base before
      :data:`FP8_ACCUMULATING_SINCE`."""
    kernels = rec.get(f"{prefix}kernels_applied") or "none"
    if kernels == "none":
        return None
    if kbit_upcast(rec, prefix):
        return "fp32-upcast QLoRA"
    if kernels == "onecard" and str(rec.get("date", "")) < KERNELS_SINCE:
        return "earlier onecard kernels"
    if rec.get("offload_activations") and not prefix and str(rec.get("date", "")) < OFFLOAD_SINCE:
        return "earlier offload prefetch"
    if kernels == "onecard" and rec.get("offload_activations") and not prefix \
            and str(rec.get("date", "")) < SPLIT_OFFLOAD_SINCE:
        return "offloaded checkpoints before the split halves"
    if kernels == "onecard" and rec.get("method") == "dora" and str(rec.get("date", "")) < DORA_SINCE:
        return "earlier onecard DoRA"
    if kernels == "onecard" and CE_CHUNK_EXPERIMENT[0] <= str(rec.get("date", "")) < CE_CHUNK_EXPERIMENT[1]:
        return "fused loss with 2048-row chunks (reverted)"
    if rec.get("quant_base", "none") == "fp8" and not prefix and str(rec.get("date", "")) < FP8_ACCUMULATING_SINCE:
        return "FP8 GEMMs before the accumulating epilogue"
    return None


def superseded(rec: dict[str, Any], prefix: str = "") -> bool:
    return superseded_reason(rec, prefix) is not None


def offloaded(rec: dict[str, Any], prefix: str = "") -> bool:
    """Did this half run with offloaded activation checkpoints? (The baseline half never offloads.)"""
    return bool(rec.get("offload_activations")) and not prefix


def row_id(rec: dict[str, Any], kernels: str, baseline: bool = False) -> str:
    ck = "ckpt" if rec["grad_ckpt"] else "nockpt"
    tail = ("-offload" if offloaded(rec, "baseline_" if baseline else "") else "") + ("-baseline" if baseline else "")
    return (f"bench-{rec.get('gpu', 'h200')}-{rec['model']}-{rec['method']}-r{rec['rank']}-s{rec['seq']}"
            f"-b{rec['micro_batch']}-{ck}-{kernels}{tail}")


def measurement_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One speed row per measured configuration (the onecard path with the kernels really applied, and the plain
    transformers + peft baseline as kernels ``none``); repeats of a configuration are averaged. Offloaded
    checkpoints are a configuration of their own (``offload_activations``): the big shapes (14B, 70B) run that way,
    and their speed differs from the same shape checkpointed on the card (split halves recompute less)."""
    rows: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec.get("device") != "cuda" or rec.get("model") == "tiny" or rec.get("group") == "validate":
            continue  # validate rows: 1-2 timed steps, a smoke test rather than a measurement
        if rec.get("offload_weights"):
            continue  # streamed weights: checked against plan/streaming.py, not calibration rows
        if rec.get("quant_base", "none") != "none":
            continue  # an FP8 base: plan/fp8.py estimates it from the bf16 efficiency, no row calibrates it
        if rec.get("uncheckpointed_layers"):
            continue  # layers left out of the checkpoints: less recompute than the grad_ckpt rows it would join
        if rec.get("cuda_graph"):
            continue  # a step replayed from a CUDA graph: none of the host time the planner's rows include
        runs = [(rec.get("kernels_applied") or "none", "", False)]
        if rec.get("baseline"):
            runs.append(("none", "baseline_", True))
        for kernels, prefix, is_base in runs:
            if rec.get(f"{prefix}status") != "ok" or superseded(rec, prefix):
                continue
            rid = row_id(rec, kernels, is_base)
            row = rows.setdefault(rid, {
                "id": rid, "gpu": rec.get("gpu", "h200"), "model": rec["model"], "method": rec["method"],
                "rank": rec["rank"], "targets": "all-linear", "seq_len": rec["seq"],
                "micro_batch": rec["micro_batch"], "grad_ckpt": rec["grad_ckpt"], "kernels": kernels,
                "offload_activations": offloaded(rec, prefix), "kbit_upcast": kbit_upcast(rec, prefix),
                "attn": "sdpa", "loss_path": rec.get(f"{prefix}loss_path"), "samples": [],
                "peak_reserved_gib": rec.get(f"{prefix}peak_reserved_gib"), "date": rec["date"][:10],
                "versions": {k: rec["versions"].get(k) for k in ("torch", "transformers", "peft", "bitsandbytes",
                                                                 "gpu", "driver")},
                "source": f"onecard bench on {rec['versions'].get('gpu')} ({rec['_file']}): {rec['config_command']}"})
            row["samples"].append(rec[f"{prefix}tokens_per_s"])
    for row in rows.values():
        row["tokens_per_s"] = round(sum(row["samples"]) / len(row["samples"]), 1)
        row["samples"] = [round(s, 1) for s in row["samples"]]
    return list(rows.values())


def split(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(calibration, held_out): every third row (indices 1, 4, 7...) of each method+kernels group, by id; then, while
    fewer than a third are held out (groups of one row hold none back), the last calibration row of the group with
    the most calibration rows, as long as that group keeps two."""
    import math

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: r["id"]):
        groups.setdefault((row["method"], row["kernels"]), []).append(row)
    calib: dict[tuple, list[dict[str, Any]]] = {}
    held: list[dict[str, Any]] = []
    for key, members in groups.items():
        for i, row in enumerate(members):
            (held if i % 3 == 1 else calib.setdefault(key, [])).append(row)
    while len(held) < math.ceil(len(rows) / 3):
        key = max(sorted(calib), key=lambda k: len(calib[k]))
        if len(calib[key]) <= 2:
            break
        held.append(calib[key].pop())
    return [r for key in groups for r in calib.get(key, [])], held


PAIR_KEYS = ("model", "method", "rank", "seq_len", "micro_batch", "grad_ckpt", "kernels", "offload_activations",
             "kbit_upcast")  # QLoRA with peft's fp32 upcast of the non-NF4 parameters runs another step


def memory_bound_shares(card_rows: list[dict[str, Any]], reference_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kernel class, the share ``m`` of a step that scales with memory bandwidth (the rest with tensor FLOP/s),
    from configurations measured on a second card (``card_rows``, measurement_rows of another card's records) that
    the profile holds for its own (``reference_rows``). Each pair gives m from the planner's own extrapolation
    (plan/speed.py): e_ref / e_card = (1 - m) + m x r, r = (bw_ref / bw_card) x (peak_card / peak_ref), so
    m = (e_ref / e_card - 1) / (r - 1). A class's share is its pairs' median, clamped to [0, 1]: an H100 against
    the H200 has the same bf16 peak and 0.70x the bandwidth, so the pair isolates the bandwidth-bound part (the
    hosts differ too, which host-bound rows would carry into m)."""
    import statistics

    from onecard.catalog.gpus import get_gpu

    by_config = {tuple(r[k] for k in PAIR_KEYS): r for r in reference_rows}
    pairs: dict[str, list[dict[str, Any]]] = {}
    for row in card_rows:
        ref_row = by_config.get(tuple(row[k] for k in PAIR_KEYS))
        if ref_row is None or ref_row["gpu"] == row["gpu"]:
            continue
        ref, card = get_gpu(ref_row["gpu"]), get_gpu(row["gpu"])
        r = (ref.bandwidth_gb_s / card.bandwidth_gb_s) * (card.bf16_dense_tflops / ref.bf16_dense_tflops)
        if abs(r - 1) < 0.1:
            continue  # cards of one balance: the pair says nothing about bandwidth
        eff_ratio = (ref_row["tokens_per_s"] / ref.bf16_dense_tflops) / (row["tokens_per_s"] / card.bf16_dense_tflops)
        pairs.setdefault(row["kernels"], []).append(
            {"card_row": row["id"], "reference_row": ref_row["id"], "tokens_per_s_ratio": round(
                row["tokens_per_s"] / ref_row["tokens_per_s"], 4), "share": round((eff_ratio - 1) / (r - 1), 4)})
    return {kernels: {"value": round(min(1.0, max(0.0, statistics.median(p["share"] for p in found))), 3),
                      "pairs": found} for kernels, found in sorted(pairs.items())}


def write_profile(rows: list[dict[str, Any]], profile_path: str | Path,
                  shares: dict[str, Any] | None = None) -> dict[str, Any]:
    """Replace our rows (ids ``bench-*``) in the profile: calibration rows into ``measurements``, the rest into
    ``held_out``, and ``shares`` (memory_bound_shares) as the memory-bound share's ``by_kernels``; every other key
    and row of the file is kept as it is."""
    path = Path(profile_path)
    data = json.loads(path.read_text(encoding="utf-8"))
    calib, held = split(rows)
    if shares is not None:
        data["memory_bound_share"]["by_kernels"] = shares
    kept = [m for m in data.get("measurements", []) if not str(m.get("id", "")).startswith("bench-")]
    data["measurements"] = kept + calib
    data["held_out"] = {
        "why": "Measured by onecard bench but never given to the planner: tests/test_bench_calibration.py checks the "
               "planner's tokens/s and peak memory on these (every third row of each method+kernels group).",
        "rows": held,
    }
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return {"calibration": len(calib), "held_out": len(held)}


def main() -> None:  # python -m onecard.bench.calibrate [PROFILE]
    import sys

    from onecard.calibration import PROFILE_PATH

    target = sys.argv[1] if len(sys.argv) > 1 else PROFILE_PATH
    rows = measurement_rows(load_records())
    # H100 rows live apart (RESULTS_DIR / "h100"): they never calibrate the H200's efficiencies, only the shares
    shares = memory_bound_shares(measurement_rows(load_records(results_dir=RESULTS_DIR / "h100")), split(rows)[0])
    print(write_profile(rows, target, shares))


if __name__ == "__main__":
    main()
