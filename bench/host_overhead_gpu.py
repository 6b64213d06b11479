"""Host (CPU) time of a LoRA step where the GPU waits on Python: Qwen 2.5 14B, seq 2048, micro-batch 2, with an FP8
base under --memory-cap-gib 24 (offloaded checkpoints) and with the bf16 base uncapped -- F19b's rows.

Run on the GPU machine from the repo root:  PYTHONPATH=src python bench/host_overhead_gpu.py
Writes $OUT/host_overhead.json and $OUT/cprofile_<quant>.txt:
- ``launch_us``: host microseconds per call of the pieces an FP8 step repeats ~1,000 times, measured while a
  ``torch.cuda._sleep`` keeps the GPU busy (so nothing waits on it), each warmed up first;
- per build: step times, the Python collector's collections in each step (generation, ms), one full
  ``gc.collect()`` timed with the startup objects frozen (train/host_gc.py) and without, and the enqueue time of
  forward, backward and optimizer step (their host time; the GPU finishes after);
- a cProfile of one step (top functions by own time), for where the host time goes.
``HOST_OVERHEAD=rounds``: instead, the FP8 row alone for 8 rounds of 5 steps, each round with the process's CPU
time over wall time, the host's steal and iowait shares (/proc/stat) and the allocator's retries and cudaMallocs:
whether a slow stretch is the host's or the process's.
"""

from __future__ import annotations

import cProfile
import gc
import io
import json
import os
import pstats
import time

import torch

from onecard.bench.build import build_model
from onecard.bench.config import BenchConfig
from onecard.bench.run import apply_kernels
from onecard.bench.step import build_optimizer, random_batch, train_step
from onecard.train.memory_cap import apply_memory_cap, clear_memory_cap

OUT = os.environ.get("OUT", "bench_out")


def launch_us() -> dict[str, float]:
    from onecard.kernels.fp8 import Fp8Weight, quantize_rows, scaled_mm_into, transpose_bytes

    x = torch.randn(4096, 5120, device="cuda", dtype=torch.bfloat16)
    w = Fp8Weight.from_dense(torch.randn(5120, 5120, device="cuda", dtype=torch.bfloat16))
    xq, xs = quantize_rows(x)
    out = torch.zeros(4096, 5120, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(16, 5120, device="cuda", dtype=torch.bfloat16)
    cs = torch.rand(5120, device="cuda")
    ops = {"quantize_rows": lambda: quantize_rows(x), "quantize_rows_col_scaled": lambda: quantize_rows(x, cs),
           "transpose_bytes": lambda: transpose_bytes(w.qdata),
           "scaled_mm_into": lambda: scaled_mm_into(out, xq, xs, w.qdata, w.scale, True, True),
           "torch_mm_rank16": lambda: x @ a.t(), "torch_cast_fp32_to_bf16": lambda: cs.to(torch.bfloat16),
           "torch_empty": lambda: torch.empty_like(x)}
    result = {}
    for name, op in ops.items():
        op()
        torch.cuda.synchronize()
        torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU spin: the calls below only queue
        t0 = time.perf_counter()
        for _ in range(200):
            op()
        result[name] = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
    return result


def collections_per_step(model, opt, batch, steps: int) -> list:
    log = []

    def callback(phase, info):
        if phase == "start":
            callback.t0 = time.perf_counter()
        else:
            log.append((info["generation"], round((time.perf_counter() - callback.t0) * 1e3, 2)))

    gc.callbacks.append(callback)
    per_step, times = [], []
    try:
        for _ in range(steps):
            log.clear()
            t0 = time.perf_counter()
            train_step(model, opt, batch)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            per_step.append(list(log))
    finally:
        gc.callbacks.remove(callback)
    return [{"step_s": t, "collections": c} for t, c in zip(times, per_step)]


def full_collection_ms(frozen: bool) -> float:
    if frozen:
        gc.freeze()
    t0 = time.perf_counter()
    gc.collect()
    ms = (time.perf_counter() - t0) * 1e3
    gc.unfreeze()
    return ms


def warmed_up(quant: str, cap_gib: float | None, offload: bool = True):
    """(model, optimizer, batch) of F19b's row for ``quant``, three steps run."""
    cfg = BenchConfig(model="qwen2.5-14b", seq=2048, micro_batch=2, kernels="onecard", offload_activations=offload,
                      quant_base=quant, memory_cap_gib=cap_gib)
    if cap_gib:
        apply_memory_cap(cap_gib)
    else:
        clear_memory_cap()
    model, vocab = build_model(cfg, "cuda")
    apply_kernels(model, "onecard")
    opt, batch = build_optimizer(model, "cuda"), random_batch(vocab, 2, 2048, "cuda")
    for _ in range(3):
        train_step(model, opt, batch)
    torch.cuda.synchronize()
    return model, opt, batch


def measure(quant: str, cap_gib: float | None) -> dict:
    model, opt, batch = warmed_up(quant, cap_gib)
    result = {"tracked_objects": len(gc.get_objects()), "full_collection_ms_unfrozen": full_collection_ms(False),
              "full_collection_ms_frozen": full_collection_ms(True)}
    gc.collect()
    gc.freeze()
    result["steps_frozen"] = collections_per_step(model, opt, batch, 8)
    gc.unfreeze()
    result["steps_unfrozen"] = collections_per_step(model, opt, batch, 8)
    t0 = time.perf_counter()
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    torch.cuda.synchronize()
    result["enqueue_s"] = {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2,
                           "gpu_after": time.perf_counter() - t3}
    profiler = cProfile.Profile()
    profiler.enable()
    train_step(model, opt, batch)
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
    with open(os.path.join(OUT, f"cprofile_{quant}.txt"), "w") as f:
        f.write(text.getvalue())
    result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    del model, opt, batch
    gc.collect()
    torch.cuda.empty_cache()
    return result


def _cpu_ticks() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def rounds() -> None:
    model, opt, batch = warmed_up("fp8", 24)
    gc.collect()
    gc.freeze()
    for i in range(8):
        ticks0, cpu0, t0, steps = _cpu_ticks(), time.process_time(), time.perf_counter(), []
        for _ in range(5):
            start = time.perf_counter()
            train_step(model, opt, batch)
            torch.cuda.synchronize()
            steps.append(round(time.perf_counter() - start, 3))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        ticks = [b - a for a, b in zip(ticks0, _cpu_ticks())]
        stats = torch.cuda.memory_stats()
        print(f"round {i}: steps {steps} process cpu/wall {cpu / wall:.2f} steal {ticks[7] / sum(ticks):.3f} "
              f"iowait {ticks[4] / sum(ticks):.3f} load {os.getloadavg()[0]:.1f} alloc retries "
              f"{stats.get('num_alloc_retries')} cudaMallocs {stats.get('num_device_alloc')}", flush=True)


def main() -> None:
    if os.environ.get("HOST_OVERHEAD") == "rounds":
        return rounds()
    os.makedirs(OUT, exist_ok=True)
    result = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "launch_us": launch_us()}
    print("launch us:", {k: round(v, 1) for k, v in result["launch_us"].items()}, flush=True)
    for quant, cap in (("fp8", 24), ("none", None)):
        r = result[quant] = measure(quant, cap)
        for mode in ("steps_frozen", "steps_unfrozen"):
            steps = r[mode]
            print(f"{quant} {mode}: mean {sum(s['step_s'] for s in steps) / len(steps):.4f} s, "
                  f"{[round(s['step_s'], 3) for s in steps]}, gc ms/step "
                  f"{[round(sum(ms for _, ms in s['collections']), 1) for s in steps]}", flush=True)
        print(f"{quant}: {r['tracked_objects']:,} objects; full gc.collect {r['full_collection_ms_unfrozen']:.0f} ms "
              f"unfrozen, {r['full_collection_ms_frozen']:.0f} ms frozen; enqueue "
              f"{ {k: round(v, 3) for k, v in r['enqueue_s'].items()} }", flush=True)
    with open(os.path.join(OUT, "host_overhead.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
