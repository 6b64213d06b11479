"""Markdown rendering of docs/benchmarks.json (kept apart from the data gathering in report.py)."""

from __future__ import annotations

from typing import Any

SUITE = "src/onecard/bench/suite.yaml"


def fmt(v, spec=",.0f") -> str:
    """A number in ``spec``, or "-" where it is missing (the generated report's tables)."""
    return "-" if v is None else format(v, spec)


def table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table (the generated report's sections share it)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render(p: dict[str, Any]) -> str:
    v = p["versions"]
    m = p["measured"]
    out = [f"""# Benchmarks: measured on an NVIDIA H200, calibrated for the RTX 4090

Every figure in a *measured* table was produced by `onecard bench` on one NVIDIA H200 (driver {v['driver']},
CUDA {v['cuda']}; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, bitsandbytes
{v['bitsandbytes']}, Python {v['python']}) on {', '.join(p['dates'])}, and is read from the raw JSON lines in
`bench/results/` by `python -m onecard.bench.report`, which writes this page and `docs/benchmarks.json`.
Models are the presets' shapes with random weights built on the GPU (QLoRA: NF4 built layer by layer), trained on
random tokens with real optimizer steps (forward, loss, backward, fused AdamW step, zero_grad): 2 warm-up steps, then
3-4 timed ones (the 70B row: 1 + 3). Peak GiB is `torch.cuda.max_memory_reserved` over warm-up and timed steps
(the CUDA context, ~0.5-0.75 GiB, is outside it). *Hours per 50k-sample epoch* assumes every sample is a full
sequence of the row's length (packed data): 50,000 x seq / tokens/s / 3600.

Reproduce: `onecard bench --suite {SUITE} --part A --json --out bench/results/h200.jsonl` (then `--part B`,
`--part C`; each part fits a 10-minute command; the runs here were launched as `python -m onecard.bench ...`, the
same command without the other verbs' imports). Each row's own command is in the last column (or in
`docs/benchmarks.json`).

"onecard" rows run onecard's fused kernels (RMSNorm, RoPE, SwiGLU, LoRA projections, fused linear cross-entropy via
`onecard.patch.apply_kernels`); "transformers + peft" rows are the `--baseline` half, plain transformers + peft with
the same model, recipe and optimizer, in the same process.
"""]
    out.append("## Seed workloads (throughput, with --baseline) - measured, H200\n")
    rows = [r for r in m if r["group"] == "throughput"]
    out.append(table(["recipe", "model", "seq", "batch", "path", "tokens/s", "h / 50k-sample epoch", "peak GiB",
                       "command"],
                      [[r["recipe"], r["model"], str(r["seq"]), str(r["batch"]), r["path"], fmt(r["tokens_per_s"]),
                        fmt(r["hours_per_50k_epoch"], ".2f"), fmt(r["peak_reserved_gib"], ".1f"), f"`{r['command']}`"]
                       for r in rows]))
    pairs = [(a, b) for a, b in zip(rows[::2], rows[1::2])]
    out.append("\nSpeed-up of onecard over transformers + peft (same process): "
               + "; ".join(f"{a['model']} {a['method']} b{a['batch']}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x "
                           f"tokens/s, {a['peak_reserved_gib'] / b['peak_reserved_gib']:.2f}x memory"
                           for a, b in pairs) + ".\n")
    out.append("\n## RTX 4090 - calibrated estimates, NOT measured\n\n"
               "The planner's figures for a 24 GiB RTX 4090 (onecard kernels), from the H200 efficiencies moved to the "
               "4090's FLOP/s and bandwidth (`onecard/plan/speed.py`); peak includes the CUDA context. The 24 GiB "
               "rows measured on the H200 below check the memory side.\n\n")
    out.append(table(["recipe", "model", "seq", "batch", "tokens/s (est.)", "h / 50k-sample epoch (est.)",
                       "peak GiB (est.)", "fits 24 GiB?", "efficiency from", "command"],
                      [[r["recipe"], r["model"], str(r["seq"]), str(r["batch"]), fmt(r["tokens_per_s"]),
                        fmt(r["hours_per_50k_epoch"], ".2f"), fmt(r["peak_gib"], ".1f"), r["verdict"],
                        r["speed_label"] + ": " + r["speed_source"].split(" on h200")[0].replace("from ", ""),
                        f"`{r['command']}`"] for r in p["rtx4090"]]))
    out.append("\nThe speed planner takes a device efficiency from the closest device-bound H200 row and a host "
               "dispatch time per layer fitted from micro-batch pairs (a step is the slower of the two); both are moved "
               "to the 4090 as described in `onecard/plan/speed.py`. Estimates, not measurements.\n")
    sections = [  # (group, heading, what the rows are)
        ("cap24", "A 24 GiB card emulated on the H200 - measured",
         "`--memory-cap-gib 24` caps PyTorch's allocator at 24 GiB minus what the process holds outside it "
         "(CUDA context and handles, measured in the same process: 0.67-0.75 GiB here). Speed is the H200's."),
        ("repeat", "Run-to-run spread - measured, H200", "The Llama 3 8B LoRA seed row again, in a later process "
         "(compare with the first row of the seed table)."),
        ("offload", "Offloaded activation checkpoints - measured, H200", "`--offload-activations` "
         "(`training.offload_activations`): each checkpointed layer's input waits in pinned host memory "
         "(patch/offload.py); the same configuration without it beside it, measured one after the other on the same machine."),
        ("stream", "Streamed base weights - measured, H200", "`--offload-weights --resident-layers N` "
         "(`training.offload_weights`): the frozen weights of all but N decoder layers wait in pinned host "
         "memory and are copied into reused GPU slots ahead of use (patch/stream_weights.py); each streamed row "
         "runs under `--memory-cap-gib 24`, beside the same shape uncapped without streaming, in one process "
         "(bench/gpu_suite.sh). Parts S18 and S18b (the first 4+4 pairs of the 70B/14B rows below) streamed the "
         "layers after the first N; parts S18c and S18d (the last pairs) stream layers spread evenly between "
         "the resident ones, which is what `onecard train` does now."),
        ("fp8", "FP8 base weights - measured, H200", "`--quant-base fp8` (`quant.base: fp8`): the frozen "
         "block linears in e4m3 with per-output-channel scales, their GEMMs through `torch._scaled_mm` "
         "(kernels/fp8.py), beside onecard's bf16 LoRA in one process (bench/gpu_suite.sh, parts F19*)."),
    ]
    for group, heading, what in sections:
        out.append(f"\n## {heading}\n\n{what}\n\n")
        out.append((_speed_table if group in ("stream", "fp8") else _memory_table)(
            [r for r in m if r["group"] == group]))
    out.append("\n## The seed's relative claims - measured, H200\n\n")
    out.append(table(["claim", "measured", "what"],
                      [[c["claim"], fmt(c["measured"], ".2f"), c["what"]] for c in p["claims"]]))
    out.append("\n## Memory matrix - measured peak vs the planner, H200\n\n"
               "Planned = `onecard.plan.memory.plan_memory` allocator figure for the same configuration (logits freed "
               "before backward, as in the bench). tests/test_bench_calibration.py holds every matrix and claim row "
               "within +-10%.\n\n")
    out.append(_memory_table([r for r in m if r["group"] in ("matrix", "claims")]))
    out.append(_notes())
    return "\n".join(out)


def _memory_table(rows) -> str:
    return table(["recipe", "model", "seq", "batch", "status", "tokens/s", "peak reserved GiB", "allocated GiB",
                   "planned GiB", "error", "command"],
                  [[r["recipe"], r["model"], str(r["seq"]), str(r["batch"]), r["status"], fmt(r["tokens_per_s"]),
                    fmt(r["peak_reserved_gib"], ".2f"), fmt(r["peak_allocated_gib"], ".2f"),
                    fmt(r.get("planned_reserved_gib"), ".2f"), fmt(r.get("planned_error_pct"), "+.1f") + "%",
                    f"`{r['command']}`"] for r in rows])


def _speed_table(rows) -> str:
    """The memory table's columns plus the run's date and the planner's tokens/s (plan/speed.py, then
    plan/streaming.py for streamed rows, plan/fp8.py for an FP8 base) and its error."""
    return table(["date", "recipe", "model", "seq", "batch", "tokens/s", "planned tokens/s", "error",
                   "peak reserved GiB", "planned GiB", "error", "command"],
                  [[r["date"][:10], r["recipe"], r["model"], str(r["seq"]), str(r["batch"]), fmt(r["tokens_per_s"]),
                    fmt(r.get("planned_tokens_per_s")), fmt(r.get("planned_speed_error_pct"), "+.1f") + "%",
                    fmt(r["peak_reserved_gib"], ".2f"), fmt(r.get("planned_reserved_gib"), ".2f"),
                    fmt(r.get("planned_error_pct"), "+.1f") + "%", f"`{r['command']}`"] for r in rows])


def _notes() -> str:
    return """
## Known misses and caveats

- **Superseded rows**: the first H200 run (bench/results/h200.jsonl, h200-cap24.jsonl) measured onecard's QLoRA
  with peft's fp32 upcast of embeddings, norms and LM head (prepare_model_for_kbit_training): an fp32 residual
  stream, 3,025 tokens/s and 3.7 GiB per 2048-token sequence at Llama 3 8B b8. onecard now casts those parameters
  back to bf16 and fuses NF4 layers into its LoRA MLP (bench/results/h200-r2.jsonl): 9,595 tokens/s at 15.8 GiB.
  The old onecard-QLoRA rows stay in the raw results, marked superseded, and are left out of calibration and of
  the planner checks; their plain transformers + peft halves (which keep the upcast) are still used.
- **Small micro-batches are host-bound**: the host's dispatch of a step (~12-14 ms per layer on this machine) can
  exceed the GPU's work (8B b1 seq 2048, and 8B seq 512 b1); the speed planner models the step as the slower of
  host and device time, with the host time fitted from micro-batch pairs.
- Random weights: a matmul on random data is the realistic case (zeros run ~13% faster on this GPU).
- Peak memory excludes the CUDA context (`max_memory_reserved` does not see it); `--memory-cap-gib` subtracts it.
- Relative claims are measured with plain kernels unless a row says otherwise; the seed's figures came from other
  stacks, so the ratios are ours, set beside them, not a verdict on the seed.
"""
