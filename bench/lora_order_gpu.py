"""Which order of a LoRA projection's two matmuls is faster on the GPU: what to change next.

Run on the GPU machine from the repo root:  PYTHONPATH=src python bench/lora_order_gpu.py
Writes $OUT/lora_order.json. Llama 3 8B shapes at 8 x 2048 tokens, bf16, r16, CUDA-event timing (median of
``REPS`` after warm-up, rotating over 3 input sets so the inputs are not L2-resident).

- forward "base_then_lora" (what kernels/lora_linear.py ``lin`` does): y = x W^T, then y += s (x A^T) B^T -- a
  K=16 matmul that reads and writes all of y (memory-bound).
- forward "lora_then_base": y = s (x A^T) B^T first (writes y once), then y += x W^T as the big GEMM with beta=1,
  whose epilogue reads y while the GEMM is compute-bound.
- the same two orders for backward's dx = dy W + s (dy B) A.
- q/k/v as three GEMMs vs one GEMM on the concatenated (6144 x 4096) weight.
"""

from __future__ import annotations

import json
import os
import statistics

import torch

OUT = os.environ.get("OUT", "bench_out")
TOKENS, RANK, REPS = 8 * 2048, 16, 30
SHAPES = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 14336), "down": (14336, 4096)}


def timed_ms(fn, sets) -> float:
    for i in range(3):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*sets[i % len(sets)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def forward_orders(d_in: int, d_out: int) -> dict:
    dev, bf = "cuda", torch.bfloat16
    w = torch.randn(d_out, d_in, device=dev, dtype=bf) * 0.02
    a = torch.randn(RANK, d_in, device=dev, dtype=bf) * 0.02
    b = torch.randn(d_out, RANK, device=dev, dtype=bf) * 0.02
    sets = [(torch.randn(TOKENS, d_in, device=dev, dtype=bf),) for _ in range(3)]

    def base_only(x):
        return x @ w.t()

    def base_then_lora(x):
        y = x @ w.t()
        return y.addmm_(x @ a.t(), b.t(), alpha=2.0)

    def lora_then_base(x):
        y = (x @ a.t()).mul_(2.0) @ b.t()
        return y.addmm_(x, w.t())

    dy_sets = [(torch.randn(TOKENS, d_out, device=dev, dtype=bf),) for _ in range(3)]

    def dx_base_then_lora(dy):
        dx = dy @ w
        return dx.addmm_(dy @ b, a, alpha=2.0)

    def dx_lora_then_base(dy):
        dx = (dy @ b).mul_(2.0) @ a
        return dx.addmm_(dy, w)

    flops = 2 * TOKENS * d_in * d_out
    row = {"d_in": d_in, "d_out": d_out, "tokens": TOKENS}
    for name, fn, s in (("base_only", base_only, sets), ("base_then_lora", base_then_lora, sets),
                        ("lora_then_base", lora_then_base, sets), ("dx_base_then_lora", dx_base_then_lora, dy_sets),
                        ("dx_lora_then_base", dx_lora_then_base, dy_sets)):
        ms = timed_ms(fn, s)
        row[name + "_ms"] = ms
        row[name + "_tflops_base"] = flops / ms / 1e9
    x = sets[0][0]
    ref = base_then_lora(x).float()
    row["orders_rel_diff"] = float((lora_then_base(x).float() - ref).norm() / ref.norm())
    return row


def fused_qkv() -> dict:
    dev, bf = "cuda", torch.bfloat16
    ws = [torch.randn(o, 4096, device=dev, dtype=bf) * 0.02 for o in (4096, 1024, 1024)]
    w_qkv = torch.cat(ws)
    sets = [(torch.randn(TOKENS, 4096, device=dev, dtype=bf),) for _ in range(3)]
    return {"three_gemms_ms": timed_ms(lambda x: [x @ w.t() for w in ws], sets),
            "one_gemm_ms": timed_ms(lambda x: (x @ w_qkv.t()).split([4096, 1024, 1024], dim=1), sets)}


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    rows = {name: forward_orders(*shape) for name, shape in SHAPES.items()}
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": rows, "qkv": fused_qkv()}
    print(json.dumps(result, indent=1))
    with open(os.path.join(OUT, "lora_order.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
