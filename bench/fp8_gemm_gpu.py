"""FP8 base GEMMs and quantisers on the GPU, against bf16 (what docs/kernels.md's FP8 section cites).

Run on the GPU machine from the repo root:  PYTHONPATH=src python bench/fp8_gemm_gpu.py
Writes $OUT/fp8_gemm.jsonl. Llama 3 8B shapes at 8 x 2048 tokens; CUDA-event timing, median of REPS after warm-up.
- forward: bf16 x @ W^T vs FP8 (torch._scaled_mm, row-wise scales) with and without the Triton row quantiser of x;
- input gradient: bf16 dy @ W vs FP8 with W's transposed copy and the column-scaled row quantiser of dy;
- quantisers: plain torch vs the Triton kernel; RMSNorm and GLU (forward, backward) without and with the FP8 copy.
- the accumulating GEMM (kernels/cublaslt.py) against torch._scaled_mm plus an add, and both with fast accumulation.
"""

from __future__ import annotations

import json
import os
import statistics

import torch

from onecard.kernels.cublaslt import matmul_into
from onecard.kernels.fp8 import (Fp8Weight, fp8_forward, fp8_input_grad, quantize_rows, quantize_rows_reference,
                                 scaled_mm)
from onecard.kernels.glu import glu_backward, glu_backward_fp8, glu_forward, glu_forward_fp8
from onecard.kernels.rms_norm import rms_norm

OUT = os.environ.get("OUT", "bench_out")
TOKENS, REPS = 8 * 2048, 20
SHAPES = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 14336), "down": (14336, 4096)}


def ms(fn) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(REPS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    rows = []
    bf = torch.bfloat16
    for name, (k, n) in SHAPES.items():
        x = torch.randn(TOKENS, k, device="cuda", dtype=bf)
        dy = torch.randn(TOKENS, n, device="cuda", dtype=bf)
        w = torch.randn(n, k, device="cuda", dtype=bf) * 0.02
        fw = Fp8Weight.from_dense(w)
        xq = quantize_rows(x)
        out = torch.zeros(TOKENS, n, device="cuda", dtype=bf)
        flop = 2 * TOKENS * k * n
        r = {"what": "gemm", "shape": name, "M": TOKENS, "K": k, "N": n,
             "bf16_fwd_ms": ms(lambda: x @ w.t()),
             "fp8_fwd_ms_prequantised": ms(lambda: fp8_forward(x, fw, xq)),
             "fp8_fwd_ms_with_quant": ms(lambda: fp8_forward(x, fw)),
             "bf16_dgrad_ms": ms(lambda: dy @ w),
             "fp8_dgrad_ms_with_quant_and_transpose": ms(lambda: fp8_input_grad(dy, fw)),
             "transpose_ms": ms(lambda: fw.transposed()),
             "quant_x_triton_ms": ms(lambda: quantize_rows(x)),
             "fp8_fwd_then_add_ms": ms(lambda: out.add_(scaled_mm(xq[0], xq[1], fw.qdata.t(), fw.scale.view(1, -1),
                                                                   bf))),
             "fp8_fwd_into_ms": ms(lambda: matmul_into(out, xq[0], xq[1].view(-1), fw.qdata, fw.scale, True)),
             "fp8_fwd_into_fast_accum_ms": ms(lambda: matmul_into(out, xq[0], xq[1].view(-1), fw.qdata, fw.scale, True,
                                                                  fast_accum=True)),
             "fp8_fwd_scaled_mm_fast_accum_ms": ms(lambda: torch._scaled_mm(xq[0], fw.qdata.t(), scale_a=xq[1],
                                                                            scale_b=fw.scale.view(1, -1),
                                                                            out_dtype=bf, use_fast_accum=True)),
             "quant_x_torch_ms": ms(lambda: quantize_rows_reference(x))}
        for key in ("bf16_fwd_ms", "fp8_fwd_ms_prequantised", "fp8_fwd_ms_with_quant", "bf16_dgrad_ms",
                    "fp8_dgrad_ms_with_quant_and_transpose"):
            r[key.replace("_ms", "_tflops")] = flop / (r[key] * 1e-3) / 1e12
        rows.append(r)
        print(json.dumps(r), flush=True)
    h, inter = 4096, 14336
    x = torch.randn(TOKENS, h, device="cuda", dtype=bf)
    wn = torch.rand(h, device="cuda", dtype=bf) + 0.5
    g, u, dh = (torch.randn(TOKENS, inter, device="cuda", dtype=bf) for _ in range(3))
    cs = torch.rand(inter, device="cuda") + 0.5
    r = {"what": "producers", "M": TOKENS,
         "rms_norm_ms": ms(lambda: rms_norm(x, wn, 1e-5)),
         "rms_norm_fp8_ms": ms(lambda: rms_norm(x, wn, 1e-5, fp8=True)),
         "rms_norm_then_quant_ms": ms(lambda: quantize_rows(rms_norm(x, wn, 1e-5))),
         "glu_fwd_ms": ms(lambda: glu_forward(g, u)),
         "glu_fwd_fp8_ms": ms(lambda: glu_forward_fp8(g, u)),
         "glu_fwd_then_quant_ms": ms(lambda: quantize_rows(glu_forward(g, u))),
         "glu_bwd_ms": ms(lambda: glu_backward(dh, g, u)),
         "glu_bwd_fp8_ms": ms(lambda: glu_backward_fp8(dh, g, u, cs, cs)),
         "glu_bwd_then_quant_ms": ms(lambda: [quantize_rows(t, cs) for t in glu_backward(dh, g, u)[1:]])}
    rows.append(r)
    print(json.dumps(r), flush=True)
    meta = {"what": "meta", "torch": torch.__version__, "device": torch.cuda.get_device_name(),
            "capability": list(torch.cuda.get_device_capability())}
    with open(os.path.join(OUT, "fp8_gemm.jsonl"), "w") as f:
        for row in [meta] + rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
