"""FP8 base weights in the planner (pure Python): bytes of an e4m3 base, and the time of its frozen GEMMs.

What runs (kernels/fp8.py, patch/fp8.py): each decoder-block nn.Linear weight is stored as e4m3 (1 byte per weight)
plus one fp32 scale per output channel; embeddings, norms and the LM head keep the model dtype. The frozen GEMMs --
forward, the checkpoint's recompute, and the input-gradient dy W -- run at the card's FP8 rate; the rank-r LoRA
matmuls, the LM head and attention stay bf16. Left out: the row-wise quantisation passes (fused into RMSNorm and the
GLU; x of o_proj and dy of o/down/q/k/v take one extra memory-bound pass each) and W's transposed copy per backward
GEMM (1 byte per weight read and written): both are memory-bound work the step's bandwidth term does not model.
"""

from __future__ import annotations

from onecard.catalog.gpus import GPU
from onecard.catalog.models import ModelShape

FP8_BYTES_PER_WEIGHT = 1
SCALE_BYTES = 4  # one fp32 scale per output channel


def fp8_base_weight_bytes(shape: ModelShape, dtype_bytes: int = 2) -> int:
    """Base parameters with the block linears in e4m3 + per-output-channel fp32 scales, the rest in the model dtype."""
    from onecard.plan.static import param_tensors

    layers = shape.num_hidden_layers
    rows = layers * sum(n_out for _, _, n_out in shape.linear_layers_per_block())
    linear = layers * shape.linear_params_per_layer()
    rest = sum(n for _, n in param_tensors(shape)) - linear
    return linear * FP8_BYTES_PER_WEIGHT + rows * SCALE_BYTES + rest * dtype_bytes


def has_fp8(gpu: GPU) -> bool:
    return gpu.fp8_dense_tflops is not None


def frozen_gemm_flops_per_token(fl) -> float:
    """FLOPs per token of the frozen block GEMMs, which run in FP8, from plan/flops.py's breakdown ``fl``: the
    forward and input-gradient matmuls less the LM head's (2 P_head each: the head stays bf16), and the recompute
    less its LoRA share (2 P_lora; the recompute's skipped down projection is already out of that term)."""
    a = fl.assumptions
    p_head = a["p_matmul"] - a["p_layers"]
    fwd = fl.term("forward_matmul") - 2.0 * p_head
    bwd = fl.term("backward_input_grads") - 2.0 * p_head
    rec = max(0.0, fl.term("recompute_forward") - 2.0 * a["p_lora"])
    return max(0.0, fwd) + max(0.0, bwd) + rec


def fp8_matmul_seconds(fl, gpu: GPU, efficiency: float) -> float:
    """Matmul time of one micro-batch with an FP8 base: the frozen GEMMs at the FP8 peak, the rest at the bf16 peak,
    both at the same achieved fraction ``efficiency`` (an estimate: no FP8 row calibrates it yet)."""
    if not has_fp8(gpu):
        raise ValueError(f"{gpu.id} has no FP8 tensor cores")
    frozen = min(frozen_gemm_flops_per_token(fl), fl.matmul_per_token)
    other = fl.matmul_per_token - frozen
    per_token = frozen / (gpu.fp8_dense_tflops * 1e12) + other / (gpu.bf16_dense_tflops * 1e12)
    return fl.tokens_per_microbatch * per_token / efficiency


def fp8_speedup_bound(fl, gpu: GPU) -> float:
    """bf16 matmul time / FP8-base matmul time at equal efficiency: the most FP8 can give on this card."""
    bf16 = fl.tokens_per_microbatch * fl.matmul_per_token / (gpu.bf16_dense_tflops * 1e12)
    return bf16 / fp8_matmul_seconds(fl, gpu, 1.0)
