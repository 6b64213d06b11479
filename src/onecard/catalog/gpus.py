"""GPU catalog: memory, bandwidth, dense bf16 tensor FLOP/s, host link. Every row cites its source.

Conventions (so rows are comparable):
- ``memory_gib``: total device memory as the driver reports it (``nvidia-smi --query-gpu=memory.total``, MiB / 1024).
  This is the ceiling the planner compares against; the CUDA context and allocator slack are *components* of the plan,
  not subtracted here.
- ``bf16_dense_tflops``: dense (no 2:4 sparsity) bf16 tensor-core throughput with **fp32 accumulate**, the mode
  PyTorch matmuls use for training. GeForce cards run fp32-accumulate at half their fp16-accumulate rate, so the
  headline "FP16 tensor" figure of a GeForce card is *not* this number.
- ``fp8_dense_tflops``: dense FP8 (e4m3) tensor-core throughput with **fp32 accumulate** (what torch._scaled_mm
  runs), None where the card has no FP8 tensor cores (Ampere). On GeForce Ada/Blackwell the fp32-accumulate rate is
  half the "FP8 with FP16 accumulate" headline (Ada whitepaper v2.02: RTX 4090 660.6 vs 330.3 dense); the data-centre
  Ada cards (L4, L40S) and Hopper run it at the full rate.
- ``host_link_gb_s``: practical one-direction host<->device copy bandwidth for pinned memory (PCIe 4.0 x16 ~25 GB/s,
  PCIe 5.0 x16 ~50 GB/s measured by bandwidthTest-style copies; theoretical 32 / 64 GB/s), used for offload and
  weight-streaming estimates (plan/streaming.py). Pinned copies measured 55 GB/s each way on the H200 bench
  machine (a bandwidth probe beside the bench runs); the H200 row keeps the conservative 50. ``pcie_gen`` / ``pcie_lanes``: the link as each row's
  source states it (RTX 4090/3090, L4, L40S, A100: PCIe 4.0 x16; RTX 5090, H100, H200: PCIe 5.0 x16).
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
    arch: str = ""               # ada, blackwell, ampere, hopper: bf16 support, kernel choices
    bf16: bool = True            # bf16 tensor cores (all cards here: Ampere and later)
    tdp_w: float = 0.0           # default board power limit, W (lint compares NVML's limit to it)
    fp8_dense_tflops: float | None = None  # dense e4m3 tensor-core TFLOP/s, fp32 accumulate; None: no FP8
    pcie_gen: int = 4            # host link generation (each row's source names it)
    pcie_lanes: int = 16

    @property
    def pcie_theoretical_gb_s(self) -> float:
        """One-direction PCIe bandwidth from the spec: 16 GT/s per lane for 4.0, 32 for 5.0, 128b/130b encoding
        (PCI-SIG PCI Express Base Specification 4.0 / 5.0): 31.5 / 63.0 GB/s at x16. ``host_link_gb_s`` is the
        practical figure the planner uses (pinned copies reach ~80% of it)."""
        gt_s = {3: 8.0, 4: 16.0, 5: 32.0}[self.pcie_gen]
        return gt_s * self.pcie_lanes * 128 / 130 / 8

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


GPUS: dict[str, GPU] = {
    g.id: g
    for g in [
        # NVIDIA Ada GPU Architecture whitepaper (v2.1), Appendix A Table 8, GeForce RTX 4090: 24 GB GDDR6X,
        # 1008 GB/s, "Peak FP16 Tensor TFLOPS with FP32 Accumulate 165.2/330.4" (dense/sparse; bf16 same rate),
        # 450 W TGP. nvidia-smi reports 24564 MiB. PCIe 4.0 x16: ~25 GB/s practical pinned copies.
        # Whitepaper v2.02, Appendix A: "Peak FP8 Tensor TFLOPS with FP32 Accumulate 330.3/660.6" (FP16 accumulate
        # 660.6/1321.2); its footnote 4: the FP32-accumulate figure "changed to proper number in v.2.02" (earlier
        # versions printed 660.6 there). torch._scaled_mm accumulates in fp32: 330.3.
        GPU("rtx4090", "NVIDIA GeForce RTX 4090", 24564 / 1024, 1008.0, 165.2, 25.0,
            "NVIDIA Ada GPU Architecture whitepaper, Table 8", arch="ada", tdp_w=450, fp8_dense_tflops=330.3),
        # NVIDIA RTX Blackwell GPU Architecture whitepaper, Appendix A, GeForce RTX 5090: 32 GB GDDR7, 1792 GB/s,
        # "Peak FP16 Tensor TFLOPS with FP32 Accumulate 209.5/419" (dense/sparse), 575 W TGP.
        # nvidia-smi reports 32607 MiB. PCIe 5.0 x16: ~50 GB/s practical.
        # Same appendix: "Peak FP8 Tensor TFLOPS with FP32 Accumulate 419/838" (dense/sparse).
        GPU("rtx5090", "NVIDIA GeForce RTX 5090", 32607 / 1024, 1792.0, 209.5, 50.0,
            "NVIDIA RTX Blackwell GPU Architecture whitepaper, Appendix A", arch="blackwell", tdp_w=575,
            fp8_dense_tflops=419.0, pcie_gen=5),
        # NVIDIA Ampere GA102 GPU Architecture whitepaper, Table 9, GeForce RTX 3090: 24 GB GDDR6X, 936 GB/s,
        # "Peak FP16 Tensor TFLOPS with FP32 Accumulate 71/142" (bf16 same rate), 350 W. nvidia-smi: 24576 MiB.
        GPU("rtx3090", "NVIDIA GeForce RTX 3090", 24576 / 1024, 936.0, 71.0, 25.0,
            "NVIDIA Ampere GA102 GPU Architecture whitepaper, Table 9", arch="ampere", tdp_w=350),
        # NVIDIA L4 Tensor Core GPU datasheet: 24 GB GDDR6, 300 GB/s, BF16 Tensor Core 242 TFLOPS *with sparsity*
        # -> 121 dense; 72 W. nvidia-smi reports 23034 MiB. PCIe 4.0 x16. FP8 Tensor Core 485 TFLOPS with sparsity
        # -> 242.5 dense.
        GPU("l4", "NVIDIA L4", 23034 / 1024, 300.0, 121.0, 25.0,
            "NVIDIA L4 Tensor Core GPU datasheet", arch="ada", tdp_w=72, fp8_dense_tflops=242.5),
        # NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s, BF16 Tensor Core 362.05 TFLOPS dense (733 sparse), 350 W.
        # nvidia-smi reports 46068 MiB. PCIe 4.0 x16. FP8 Tensor Core 733 TFLOPS dense (1,466 sparse).
        GPU("l40s", "NVIDIA L40S", 46068 / 1024, 864.0, 362.05, 25.0,
            "NVIDIA L40S GPU datasheet", arch="ada", tdp_w=350, fp8_dense_tflops=733.0),
        # NVIDIA A100 Tensor Core GPU datasheet (SXM4 40GB): 40 GB HBM2, 1555 GB/s, BF16 Tensor Core 312 TFLOPS dense
        # (624 sparse), 400 W. nvidia-smi reports 40960 MiB. PCIe 4.0 x16 to the host.
        GPU("a100-40gb", "NVIDIA A100-SXM4-40GB", 40960 / 1024, 1555.0, 312.0, 25.0,
            "NVIDIA A100 Tensor Core GPU datasheet", arch="ampere", tdp_w=400),
        # NVIDIA A100 datasheet (SXM4 80GB): 80 GB HBM2e, 2039 GB/s, BF16 312 TFLOPS dense, 400 W.
        # nvidia-smi reports 81920 MiB.
        GPU("a100-80gb", "NVIDIA A100-SXM4-80GB", 81920 / 1024, 2039.0, 312.0, 25.0,
            "NVIDIA A100 Tensor Core GPU datasheet", arch="ampere", tdp_w=400),
        # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 80 GB HBM3, 3.35 TB/s, BF16 Tensor Core 1979 TFLOPS *with
        # sparsity* -> 989.4 dense; up to 700 W. nvidia-smi reports 81559 MiB. PCIe 5.0 x16 to the host.
        # FP8 Tensor Core 3,958 TFLOPS with sparsity -> 1979 dense.
        GPU("h100-sxm", "NVIDIA H100 80GB HBM3", 81559 / 1024, 3350.0, 989.4, 50.0,
            "NVIDIA H100 Tensor Core GPU datasheet", arch="hopper", tdp_w=700, fp8_dense_tflops=1979.0, pcie_gen=5),
        # NVIDIA H100 datasheet (PCIe): 80 GB HBM2e, 2.0 TB/s, BF16 1513 TFLOPS sparse -> 756.5 dense, 350 W.
        # FP8 3,026 TFLOPS sparse -> 1513 dense.
        GPU("h100-pcie", "NVIDIA H100 PCIe", 81559 / 1024, 2000.0, 756.5, 50.0,
            "NVIDIA H100 Tensor Core GPU datasheet", arch="hopper", tdp_w=350, fp8_dense_tflops=1513.0, pcie_gen=5),
        # NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, BF16 1979 TFLOPS sparse -> 989.4 dense,
        # up to 700 W. nvidia-smi reports 143771 MiB. PCIe 5.0 x16 to the host. FP8 3,958 TFLOPS sparse -> 1979 dense.
        GPU("h200", "NVIDIA H200", 143771 / 1024, 4800.0, 989.4, 50.0,
            "NVIDIA H200 Tensor Core GPU datasheet", arch="hopper", tdp_w=700, fp8_dense_tflops=1979.0, pcie_gen=5),
    ]
}

# Names people type, and names drivers report (torch.cuda.get_device_name), mapped to catalog ids.
ALIASES: dict[str, str] = {
    "4090": "rtx4090", "rtx-4090": "rtx4090", "5090": "rtx5090", "rtx-5090": "rtx5090", "3090": "rtx3090",
    "a100": "a100-80gb", "a100-80g": "a100-80gb", "a100-40g": "a100-40gb", "h100": "h100-sxm", "h100-80gb": "h100-sxm",
    "h200-sxm": "h200", "h200-141gb": "h200",
}


def get_gpu(gpu_id: str) -> GPU:
    from onecard.errors import UserError

    key = gpu_id.lower().replace("_", "-").strip()
    key = ALIASES.get(key, key)
    if key not in GPUS:
        raise UserError(f"unknown GPU {gpu_id!r}", where="--gpu", fix=f"use one of: {', '.join(GPUS)} (onecard gpus)")
    return GPUS[key]


def match_device_name(device_name: str) -> GPU | None:
    """The catalog row for a driver-reported name such as ``NVIDIA GeForce RTX 4090`` or ``NVIDIA H200``."""
    name = device_name.lower()
    for gpu in sorted(GPUS.values(), key=lambda g: -len(g.name)):
        if gpu.name.lower() in name or name in gpu.name.lower():
            return gpu
    for token, gpu_id in (("4090", "rtx4090"), ("5090", "rtx5090"), ("3090", "rtx3090"), ("h200", "h200"),
                          ("h100", "h100-sxm"), ("l40s", "l40s"), ("l4", "l4")):
        if token in name:
            return GPUS[gpu_id]
    if "a100" in name:
        return GPUS["a100-40gb" if "40gb" in name else "a100-80gb"]
    return None
