"""Where a CUDA-graphed step's memory goes, against the same step run eagerly: the graph's private pool and the
eager pool, each from ``torch.cuda.memory_snapshot()`` (onecard.bench.memory_snapshot), after the steps and after a
held-out eval between steps.

Why: the planner plans a graphed step as the eager one, and the graphed runs reserved more -- 0.70 GiB for the
bench step of Qwen 2.5 14B FP8 on the H200, 1.08 GiB more than the eager run in ``onecard train`` with evals on an
H100 (docs/benchmarks.md) -- with the mechanism unmeasured. A pool's cached blocks serve only that pool, so what runs
eagerly beside the graph (optimizer step, eval, the first step's optimizer state) cannot reuse the graph's blocks.

Run on the GPU machine from the repo root:  PYTHONPATH=src python bench/graph_memory_gpu.py
One JSON line per (case, mode) on stdout and in $OUT/graph_memory.jsonl; bench/report_extra.py compares them with
the planner's figures of today (``planned_peak_gib`` is the one of the day the row was measured).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from datetime import datetime, timezone

import peft
import torch
import transformers

from onecard.bench.build import build_model
from onecard.bench.config import BenchConfig
from onecard.bench.memory_snapshot import summarize_snapshot
from onecard.bench.predict import peak_memory as planned_peak
from onecard.bench.run import apply_kernels
from onecard.bench.step import build_optimizer, free_cuda, graphed_train_step, random_batch, train_step
from onecard.eval.loss import heldout_loss
from onecard.train.memory_cap import apply_memory_cap, clear_memory_cap

OUT = os.environ.get("OUT", "bench_out")
GIB = 2**30
STEPS = 5
CASES = {  # name: (BenchConfig fields, memory cap in GiB or None)
    "qwen14b-fp8-cap24": (dict(model="qwen2.5-14b", seq=2048, micro_batch=2, quant_base="fp8"), 24.0),
    "llama8b-bf16": (dict(model="llama-3-8b", seq=2048, micro_batch=8), None),
}


def _pools_gib(where: str) -> dict:
    summary = summarize_snapshot(torch.cuda.memory_snapshot(), device=torch.cuda.current_device())
    return {f"{where}_{name}_{key}_gib": round(acc[f"{key}_bytes"] / GIB, 3)
            for name, acc in summary["pools"].items() for key in ("reserved", "allocated", "inactive")}


def _peaks(where: str) -> dict:
    return {f"{where}_max_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
            f"{where}_max_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3)}


def measure(name: str, mode: str) -> dict:
    fields, cap_gib = CASES[name]
    cfg = BenchConfig(kernels="onecard", grad_ckpt=True, cuda_graph=mode == "graph", memory_cap_gib=cap_gib, **fields)
    apply_memory_cap(cap_gib) if cap_gib else clear_memory_cap()
    free_cuda()
    model, vocab = build_model(cfg, "cuda")
    apply_kernels(model, "onecard")
    optimizer, batch = build_optimizer(model, "cuda"), random_batch(vocab, cfg.micro_batch, cfg.seq, "cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    row = {"case": name, "mode": mode, "config": asdict(cfg), "memory_cap_gib": cap_gib,
           "weights_allocated_gib": round(torch.cuda.memory_allocated() / GIB, 3),
           "planned_peak_gib": planned_peak(cfg).get("predicted_peak_gib")}
    if mode == "graph":
        from onecard.train.graphed_step import capture

        graphed = capture(model, batch)
        torch.cuda.synchronize()
        row.update(_peaks("capture") | _pools_gib("capture"))
        one_step = lambda: graphed_train_step(graphed, optimizer, batch)  # noqa: E731
    else:
        one_step = lambda: train_step(model, optimizer, batch)  # noqa: E731
    t0 = time.perf_counter()
    for _ in range(STEPS):
        one_step()
    torch.cuda.synchronize()
    row["steps_s"] = round(time.perf_counter() - t0, 3)
    row.update(_peaks("steps") | _pools_gib("steps"))
    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in batch["input_ids"].cpu()]
    row["eval_loss"] = heldout_loss(model, rows, pad_id=0, batch_size=cfg.micro_batch)["loss"]
    torch.cuda.synchronize()
    row.update(_peaks("eval") | _pools_gib("eval"))
    one_step()  # a step after the eval: does the eval's eager memory come back for the optimizer, or stay apart
    torch.cuda.synchronize()
    row.update(_peaks("after_eval_step") | _pools_gib("after_eval_step"))
    del model, optimizer, batch
    if mode == "graph":
        del graphed, one_step
    free_cuda()
    return row


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    only = [c for c in os.environ.get("ONLY", "").split(",") if c]
    with open(os.path.join(OUT, "graph_memory.jsonl"), "a") as out:
        for name in only or CASES:
            for mode in ("eager", "graph"):
                try:
                    row = measure(name, mode)
                except torch.cuda.OutOfMemoryError as exc:
                    row = {"case": name, "mode": mode, "error": "OOM", "message": str(exc).splitlines()[0][:200]}
                    free_cuda()
                row.update(command="PYTHONPATH=src:.whl/site python bench/graph_memory_gpu.py",
                           date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           versions={"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                     "transformers": transformers.__version__, "peft": peft.__version__})
                print(json.dumps(row), flush=True)
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
