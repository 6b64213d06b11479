"""What the host-bound 14B FP8 step would gain from two host-time cuts, measured in one process each: the adapters'
once-per-step compute copies (patch/adapter_copies.py) against casting per use, and the last k decoder layers run
without checkpoints (their recompute gone, their activations kept on the GPU) -- F19b's rows, Qwen 2.5 14B LoRA r16,
seq 2048, micro-batch 2.

Run on the GPU machine from the repo root:  PYTHONPATH=src python bench/host_ablation_gpu.py
Prints one JSON line per setting (and writes them to $OUT/host_ablation.jsonl): mean, min and max seconds of 8 timed
steps after 2 warm-up steps, the host's enqueue time of one forward and one backward, how long the GPU ran after the
backward was queued (0: the host set the speed), and peak reserved memory. A setting that runs out of memory under
the cap prints ``"error": "OOM"``. Settings alternate copies on and off so that a drift in the host's speed shows.
"""

from __future__ import annotations

import gc
import json
import os
import time

import torch

from host_overhead_gpu import warmed_up  # bench/ is the script's directory: F19b's rows, built the same way

import onecard.patch.adapter_copies as adapter_copies
from onecard.bench.step import train_step
from onecard.patch.stream_weights import decoder_layers
from onecard.train.host_gc import freeze_startup_objects, unfreeze
from onecard.train.model import uncheckpoint_last_layers

OUT = os.environ.get("OUT", "bench_out")
MAKE_COPIES = adapter_copies.make_copies
TOKENS = 2 * 2048


def _set(model, copies: bool, uncheckpointed: int) -> None:
    """Copies on or off; every layer checkpointed again, then the trainer's own uncheckpointing of the last ones."""
    adapter_copies.make_copies = MAKE_COPIES if copies else (lambda parents, dtype: 0)
    for layer in decoder_layers(model):
        layer.gradient_checkpointing = True
    uncheckpoint_last_layers(model, uncheckpointed)


def _measure(model, opt, batch) -> dict:
    for _ in range(2):
        train_step(model, opt, batch)
    torch.cuda.synchronize()
    times = []
    # as the training loop does (train/host_gc.py); unfrozen on an out-of-memory step too, or the frozen model's
    # reference cycles outlive ``run`` and the next build finds its memory still taken
    freeze_startup_objects()
    try:
        for _ in range(8):
            t0 = time.perf_counter()
            train_step(model, opt, batch)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    finally:
        unfreeze()
    t0 = time.perf_counter()
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    return {"step_s": sum(times) / len(times), "step_s_min": min(times), "step_s_max": max(times),
            "tokens_per_s": TOKENS * len(times) / sum(times), "enqueue_forward_s": t1 - t0,
            "enqueue_backward_s": t2 - t1, "gpu_after_s": t3 - t2,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def run(quant: str, cap_gib: float | None, offload: bool, settings) -> list[dict]:
    model, opt, batch = warmed_up(quant, cap_gib, offload)
    rows = []
    for copies, uncheckpointed in settings:
        _set(model, copies, uncheckpointed)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        row = {"quant_base": quant, "memory_cap_gib": cap_gib, "offload_activations": offload, "copies": copies,
               "uncheckpointed_layers": uncheckpointed}
        try:
            row.update(_measure(model, opt, batch))
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            row["error"] = "OOM"
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)
        gc.collect()
    _set(model, True, 0)
    del model, opt, batch
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    print("torch", torch.__version__, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), flush=True)
    alternating = [(True, 0), (False, 0), (True, 0), (False, 0)]
    rows = run("fp8", 24, True, alternating + [(True, 6), (True, 10), (True, 14)])
    rows += run("fp8", 24, False, alternating[:2] + [(True, 8)])
    rows += run("none", None, True, alternating[:2])
    with open(os.path.join(OUT, "host_ablation.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
