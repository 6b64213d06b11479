"""Fused linear cross-entropy at Llama 3 8B's head (16k tokens, hidden 4096, vocab 128,256) for several chunk sizes:
forward (which also computes the gradients) plus backward, CUDA-event median (kernels/fused_ce.py
MIN_CHUNK_ROWS). Run on the GPU machine from the repo root: PYTHONPATH=src python bench/ce_chunk_gpu.py"""

from __future__ import annotations

import json
import os
import statistics

import torch

from onecard.kernels.fused_ce import fused_linear_cross_entropy

OUT = os.environ.get("OUT", "bench_out")


def main() -> None:
    tokens, hidden, vocab = 16384, 4096, 128256
    h = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.02)
    y = torch.randint(0, vocab, (tokens,), device="cuda")
    rows = {}
    for chunk in (512, 1024, 2048, 4096):
        times = []
        for i in range(8):
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fused_linear_cross_entropy(h, w, y, chunk_size=chunk)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            end.record()
            end.synchronize()
            h.grad = None
            if i >= 2:
                times.append(start.elapsed_time(end))
        rows[chunk] = {"ms": statistics.median(times), "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": tokens, "vocab": vocab,
              "hidden": hidden, "chunks": rows}
    print(json.dumps(result, indent=1))
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "ce_chunk.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
