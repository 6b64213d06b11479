"""GPU catalog: memory, bandwidth, dense bf16 tensor FLOP/s, host link. Every row cites its source.

(The plan helper fills GPUS; the dataclass is the interface the planner and bench rely on.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    id: str                      # catalog id used on the command line, e.g. "rtx4090"
    name: str                    # marketing name, e.g. "NVIDIA GeForce RTX 4090"
    memory_gib: float            # usable device memory as reported by the driver, GiB
    bandwidth_gb_s: float        # peak DRAM bandwidth, GB/s (1e9 bytes/s)
    bf16_dense_tflops: float     # dense bf16 tensor-core TFLOP/s with fp32 accumulate (no sparsity)
    host_link_gb_s: float        # practical host<->device bandwidth, GB/s (PCIe/NVLink-C2C)
    source: str                  # where the figures come from


GPUS: dict[str, GPU] = {}


def get_gpu(gpu_id: str) -> GPU:
    from onecard.errors import UserError

    key = gpu_id.lower().replace("_", "-")
    if key not in GPUS:
        raise UserError(f"unknown GPU {gpu_id!r}", where="--gpu", fix=f"use one of: {', '.join(GPUS)} (onecard gpus)")
    return GPUS[key]
