"""FP8 base weights in the planner (pure Python): bytes of an e4m3 base, and the time of its frozen GEMMs.

What runs (kernels/fp8.py, patch/fp8.py): each decoder-block nn.Linear weight is stored as e4m3 (1 byte per weight)
plus one fp32 scale per output channel; embeddings, norms and the LM head keep the model dtype. The frozen GEMMs --
forward, the checkpoint's recompute, and the input-gradient dy W -- run at the card's FP8 rate; the rank-r LoRA
matmuls, the LM head and attention stay bf16. Left out: the row-wise quantisation passes (fused into RMSNorm and the
GLU; x of o_proj and dy of o/down/q/k/v take one extra memory-bound pass each) and W's transposed copy per backward
GEMM (1 byte per weight read and written) are memory-bound: :func:`fp8_extra_bytes` counts them.

Speed: the calibrated bf16 efficiency lumps everything a step does besides matmuls (elementwise work, attention,
launch gaps) into its matmul time, so an FP8 estimate that divides the faster GEMMs by the same efficiency shrinks
that fixed work too (it read 37-47% high against the H200). :func:`fp8_matmul_seconds` instead keeps the bf16 step's
time and swaps only the frozen GEMMs' share: their FLOPs at the bf16 GEMM rate cuBLAS reaches, out; at the FP8 rate
torch._scaled_mm reaches in a step, in (:data:`GEMM_FRACTION`).
"""

from __future__ import annotations

from onecard.catalog.gpus import GPU
from onecard.catalog.models import ModelShape

FP8_BYTES_PER_WEIGHT = 1
SCALE_BYTES = 4  # one fp32 scale per output channel
# Fraction of the dense peak the frozen GEMMs reach inside a training step. bf16: `@` at 680-787 TFLOP/s of 989
# (~0.75) on the Llama 3 8B and 70B projection shapes, H200, torch 2.11, 2026-12-02 (bench/fp8_gemm_gpu.py;
# docs/kernels.md). fp8: fitted end to end, the value that zeroes the mean planned-minus-measured speed of the
# H200's 7-8B FP8 rows (Llama 3 8B, Mistral 7B, Qwen 2.5 7B, seq 2048 x 8, bench/results/h200-f19g.jsonl: -1.7%,
# +2.0%, -0.6%); held out from the fit, the Qwen 2.5 14B rows replayed from a CUDA graph (h200-f19x*.jsonl) then
# plan 3.2-3.7% under. The GEMM microbenchmark alone reads 0.64 (torch._scaled_mm row-wise e4m3, 1,185-1,349 of
# 1,979); why the step gains more than it is not measured -- its FP8 GEMMs also take the LoRA term in cuBLASLt's
# epilogue and the forward ones accumulate fast (kernels/cublaslt.py), which the microbenchmark does not. Other
# cards: the same fractions, an estimate.
GEMM_FRACTION = {"bf16": 0.75, "fp8": 0.77}
QUANT_PASS_BYTES = 5  # a row quantiser reads bf16 twice (amax, then codes) and writes 1 byte per element


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


def fp8_matmul_seconds(fl, gpu: GPU, bf16_matmul_s: float) -> float:
    """Matmul time of one micro-batch with an FP8 base, from the bf16 estimate ``bf16_matmul_s`` of the same
    configuration: the frozen GEMMs' time at the bf16 GEMM rate replaced by their time at the FP8 rate (module
    docstring); never below the frozen GEMMs alone."""
    if not has_fp8(gpu):
        raise ValueError(f"{gpu.id} has no FP8 tensor cores")
    frozen = min(frozen_gemm_flops_per_token(fl), fl.matmul_per_token) * fl.tokens_per_microbatch
    as_bf16 = frozen / (gpu.bf16_dense_tflops * 1e12 * GEMM_FRACTION["bf16"])
    as_fp8 = frozen / (gpu.fp8_dense_tflops * 1e12 * GEMM_FRACTION["fp8"])
    return max(as_fp8, bf16_matmul_s - as_bf16 + as_fp8)


def fp8_extra_bytes(shape: ModelShape, tokens: int, recomputed_layers: int) -> int:
    """DRAM bytes an FP8 base adds to one micro-batch: W's transposed copy per backward GEMM (read and written),
    the standalone row quantisers (x of o_proj per forward pass; dy of o, down, q, k, v in backward), and the
    quantised copies the RMSNorm and GLU kernels write and re-read for their row amax (kernels/fp8.py).
    ``recomputed_layers``: those a checkpoint's recompute runs forward a second time."""
    h, i, layers = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    transposes = 2 * FP8_BYTES_PER_WEIGHT * shape.linear_params_per_layer()
    dy_quant = (2 * h + shape.q_dim + 2 * shape.kv_dim) * QUANT_PASS_BYTES
    per_pass = shape.q_dim * QUANT_PASS_BYTES + 2 * h * 3 + i * QUANT_PASS_BYTES
    return layers * (transposes + tokens * (dy_quant + per_pass + 2 * i * 3)) + recomputed_layers * tokens * per_pass


def fp8_backward_transient_bytes(shape: ModelShape, tokens: int, kernels: str) -> int:
    """Bytes an FP8 base adds to the worst moment of one block's backward, beside the bf16 gradients that
    plan/activations.py counts: the e4m3 codes (and fp32 row scales) of the gradients the input-gradient GEMMs
    read, and the transposed W of one such GEMM (each made per use and freed after it, kernels/fp8.py
    ``fp8_input_grad``). onecard's fused GLU backward writes the codes of dg and du together (kernels/glu.py
    ``glu_backward_fp8``) and they live through the gate and up GEMMs; the unfused path quantises one
    projection's dy at a time. Without this term the plan was 7.8-9.5% under the measured peak reserved of the
    H200's Llama 3 8B and Mistral 7B FP8 rows at 16,384 tokens (bench/results/h200-f19g.jsonl); with it, within 5%."""
    i = shape.intermediate_size
    per_token = (2 * (i + SCALE_BYTES) if kernels == "onecard"
                 else max(n_out for _, _, n_out in shape.linear_layers_per_block()) + SCALE_BYTES)
    transposed = FP8_BYTES_PER_WEIGHT * max(n_in * n_out for _, n_in, n_out in shape.linear_layers_per_block())
    return per_token * tokens + transposed


def fp8_speedup_bound(fl, gpu: GPU) -> float:
    """bf16 matmul time / FP8-base matmul time, every matmul at its datasheet peak: the most FP8 can give here."""
    frozen = min(frozen_gemm_flops_per_token(fl), fl.matmul_per_token)
    fp8 = frozen / gpu.fp8_dense_tflops + (fl.matmul_per_token - frozen) / gpu.bf16_dense_tflops
    return (fl.matmul_per_token / gpu.bf16_dense_tflops) / fp8
