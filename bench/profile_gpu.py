"""Where a patched Llama 3 8B LoRA step spends its GPU time: what to fuse next.

Run on the GPU machine from the repo root:  PYTHONPATH=src python bench/profile_gpu.py
Same setup as bench/kernels_gpu.py (Llama 3 8B shape, random bf16 weights, LoRA r16 on 7 projections,
seq 2048, micro-batch 8, non-reentrant checkpointing, onecard kernels). Writes $OUT/profile.json:
the reachable bf16 GEMM rate at this step's shapes, the step's kernels grouped (GEMM, attention,
Triton, other) and the 40 most expensive kernels, so the gap to the FLOP ceiling has names.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernels_gpu import MICRO_BATCH, SEQ, build_model  # noqa: E402

OUT = os.environ.get("OUT", "bench_out")


def gemm_tflops(m: int, k: int, n: int, reps: int = 20) -> float:
    """bf16 (m x k) @ (k x n) rate that cuBLAS reaches on this card, in TFLOP/s."""
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e12


def kernel_group(name: str) -> str:
    lowered = name.lower()
    if any(s in lowered for s in ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "cublas")):
        return "gemm"
    if any(s in lowered for s in ("flash", "fmha", "attention", "cudnn")):
        return "attention"
    if lowered.startswith("triton") or "_kernel" in lowered and "at::" not in lowered:
        return "triton"
    if "memcpy" in lowered or "memset" in lowered:
        return "copy"
    return "other (torch elementwise/reduce)"


def profile_step(model, opt=None, micro_batch: int = MICRO_BATCH) -> dict:
    """``opt``: the optimizer (default: torch's AdamW, unfused, as the first kernel profiles ran)."""
    from torch.profiler import ProfilerActivity, profile

    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt or torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (micro_batch, SEQ), device="cuda")

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if us > 0:
            rows.append({"name": evt.key[:160], "count": evt.count, "ms": us / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    groups: dict[str, float] = {}
    for r in rows:
        groups[kernel_group(r["name"])] = groups.get(kernel_group(r["name"]), 0.0) + r["ms"]
    return {"step_s": step_s, "tokens_per_s": micro_batch * SEQ / step_s,
            "kernel_ms_total": sum(r["ms"] for r in rows), "groups_ms": groups, "top": rows[:40]}


def main_bench_pair() -> None:
    """``PROFILE_PAIR=fp8``: the F19 pair as ``onecard bench`` builds it (bench/build.py: fused kernels, offloaded
    checkpoints, bf16 base then FP8 base), each step profiled; writes $OUT/profile_fp8_pair.json. Other shapes:
    PROFILE_MODEL (a preset), PROFILE_MICRO_BATCH, PROFILE_OFFLOAD=0 (checkpoints kept on the card), PROFILE_QUANTS
    (comma-separated, default "none,fp8"); the file is then profile_fp8_<model>_b<micro-batch>.json."""
    import gc

    from onecard.bench.build import build_model as build_bench_model
    from onecard.bench.config import BenchConfig
    from onecard.bench.run import apply_kernels
    from onecard.bench.step import build_optimizer

    os.makedirs(OUT, exist_ok=True)
    model_name = os.environ.get("PROFILE_MODEL", "llama-3-8b")
    micro_batch = int(os.environ.get("PROFILE_MICRO_BATCH", MICRO_BATCH))
    offload = os.environ.get("PROFILE_OFFLOAD", "1") == "1"
    result = {}
    for quant in os.environ.get("PROFILE_QUANTS", "none,fp8").split(","):
        cfg = BenchConfig(model=model_name, seq=SEQ, micro_batch=micro_batch, kernels="onecard",
                          offload_activations=offload, quant_base=quant)
        model, _ = build_bench_model(cfg, "cuda")
        applied = apply_kernels(model, cfg.kernels)["kernels_applied"]  # as run.measure does after the build
        assert applied == "onecard", f"onecard's kernels did not apply: {applied}"
        result[quant] = profile_step(model, build_optimizer(model, "cuda"), micro_batch)  # the bench's fused AdamW
        p = result[quant]
        print(f"{model_name} b{micro_batch} offload={offload} {quant}: step {p['step_s']:.3f} s, "
              f"{p['tokens_per_s']:,.0f} tokens/s", flush=True)
        for g, ms in sorted(p["groups_ms"].items(), key=lambda kv: -kv[1]):
            print(f"  {g:34s} {ms:8.1f} ms")
        for r in p["top"][:25]:
            print(f"  {r['ms']:8.1f} ms {r['count']:6d}  {r['name'][:110]}")
        del model
        gc.collect()
        torch.cuda.empty_cache()
    name = "profile_fp8_pair.json" if (model_name, micro_batch) == ("llama-3-8b", MICRO_BATCH) else \
        f"profile_fp8_{model_name}_b{micro_batch}.json"
    result["config"] = {"model": model_name, "micro_batch": micro_batch, "seq": SEQ, "offload_activations": offload,
                        "torch": torch.__version__}
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(result, f, indent=1)


def main() -> None:
    if os.environ.get("PROFILE_PAIR") == "fp8":
        return main_bench_pair()
    os.makedirs(OUT, exist_ok=True)
    tokens = MICRO_BATCH * SEQ
    rates = {"mlp_up_16k_4096_14336": gemm_tflops(tokens, 4096, 14336),
             "mlp_down_16k_14336_4096": gemm_tflops(tokens, 14336, 4096),
             "q_16k_4096_4096": gemm_tflops(tokens, 4096, 4096),
             "kv_16k_4096_1024": gemm_tflops(tokens, 4096, 1024),
             "lora_a_16k_4096_16": gemm_tflops(tokens, 4096, 16)}
    print(rates, flush=True)
    from onecard.patch import apply_kernels

    model = build_model()
    handle = apply_kernels(model, "onecard")
    result = {"gemm_tflops": rates, "patched": handle.summary(), "onecard": profile_step(model)}
    with open(os.path.join(OUT, "profile.json"), "w") as f:
        json.dump(result, f, indent=1)
    p = result["onecard"]
    print(f"step {p['step_s']:.3f} s, {p['tokens_per_s']:,.0f} tokens/s, kernels {p['kernel_ms_total']:.0f} ms")
    for g, ms in sorted(p["groups_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {g:34s} {ms:8.1f} ms")
    for r in p["top"]:
        print(f"  {r['ms']:8.1f} ms {r['count']:6d}  {r['name'][:110]}")


if __name__ == "__main__":
    main()
