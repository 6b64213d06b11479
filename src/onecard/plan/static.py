"""Static memory: base weights, adapter weights, gradients, optimizer states -- exact byte counts.

These terms are not estimates: each is the sum of the tensors transformers / peft / bitsandbytes / torch create,
and tests/test_plan_exact.py builds tiny models and checks the sums to the byte. Tensor lists follow
transformers' modeling_<family>.py (parameters), peft's LoraLayer (adapters) and bitsandbytes 0.50 (NF4 quant
state, 8-bit optimizer state).
"""

from __future__ import annotations

from functools import lru_cache
from math import ceil

from onecard.catalog.models import ModelShape

FP32 = 4
NF4_BLOCK = 64            # bitsandbytes Params4bit default blocksize
NF4_NESTED_BLOCK = 256    # double quant: absmax quantised in blocks of 256 (bnb.functional.quantize_4bit)
BNB_8BIT_BLOCK = 256      # bitsandbytes 0.50 Optimizer2State.init_state: blocksize = 256 (older releases: 2048)
BNB_MIN_8BIT_SIZE = 4096  # tensors with fewer elements keep fp32 state (Optimizer8bit min_8bit_size default)


@lru_cache(maxsize=512)
def param_tensors(shape: ModelShape) -> tuple[tuple[str, int], ...]:
    """``(kind, numel)`` for every parameter tensor of the transformers model (tied lm_head counted once)."""
    h = shape.hidden_size
    out: list[tuple[str, int]] = [("embed", shape.embedding_params())]
    for _ in range(shape.num_hidden_layers):
        for name, n_in, n_out in shape.linear_layers_per_block():
            out.append(("linear", n_in * n_out))
            if shape.attention_bias and name in ("q_proj", "k_proj", "v_proj"):
                out.append(("bias", n_out))
        out.extend(("norm", h) for _ in range(shape.norms_per_layer))
    out.append(("norm", h))
    if not shape.tie_word_embeddings:
        out.append(("lm_head", shape.lm_head_params()))
    return tuple(out)


def nf4_tensor_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes holds for one NF4 weight: packed 4-bit data plus its QuantState.

    Packed data: two 4-bit codes per byte (Params4bit shape (numel/2, 1) uint8). One absmax per 64-element block.
    Without double quant the absmax are fp32; with it they are quantised to uint8 in blocks of 256 with one fp32
    absmax per block of blocks, an fp32 offset, and a 256-entry fp32 dynamic code map (``state2.code``). Every
    QuantState also carries the 16-entry fp32 NF4 code. All of these are per-tensor copies (checked: no sharing).
    """
    blocks = ceil(numel / NF4_BLOCK)
    packed = ceil(numel / 2)
    code = 16 * FP32
    if not double_quant:
        return packed + blocks * FP32 + code
    nested_blocks = ceil(blocks / NF4_NESTED_BLOCK)
    return packed + blocks + nested_blocks * FP32 + 256 * FP32 + FP32 + code


def base_weight_bytes(shape: ModelShape, method: str, dtype_bytes: int = 2, *, double_quant: bool = True,
                      kbit_upcast: bool = True) -> int:
    """Base model parameters. QLoRA: the blocks' nn.Linear weights in NF4 (transformers skips lm_head and never
    quantises embeddings or norms); peft's ``prepare_model_for_kbit_training`` then casts every non-4-bit parameter
    (embeddings, lm_head, norms, Qwen2's biases) to fp32 -- ``kbit_upcast`` -- which on a 128k-vocabulary model is
    ~4 GB of the budget.
    """
    if method != "qlora":
        return sum(n for _, n in param_tensors(shape)) * dtype_bytes
    other_bytes = FP32 if kbit_upcast else dtype_bytes
    total = 0
    for kind, numel in param_tensors(shape):
        total += nf4_tensor_bytes(numel, double_quant) if kind == "linear" else numel * other_bytes
    return total


@lru_cache(maxsize=512)
def adapter_tensors(shape: ModelShape, method: str, rank: int, targets: tuple[str, ...]) -> tuple[int, ...]:
    """numel of each trainable adapter tensor: LoRA A (r x in), B (out x r); DoRA adds a magnitude vector (out)."""
    out: list[int] = []
    for _ in range(shape.num_hidden_layers):
        for name, n_in, n_out in shape.linear_layers_per_block():
            if name in targets:
                out += [rank * n_in, n_out * rank] + ([n_out] if method == "dora" else [])
    return tuple(out)


def adapter_dtype_bytes(dtype_bytes: int) -> int:
    """peft's ``autocast_adapter_dtype=True`` (the default of get_peft_model) creates adapter weights in fp32 when the
    base is bf16/fp16 (checked on peft 0.21: lora_A/lora_B/magnitude are float32 on a bf16 model)."""
    return FP32


def trainable_tensors(shape: ModelShape, method: str, rank: int, targets) -> tuple[int, ...]:
    if method == "full":
        return tuple(n for _, n in param_tensors(shape))
    return adapter_tensors(shape, method, rank, tuple(targets))


def nf4_linear_bytes(shape: ModelShape, double_quant: bool = True) -> int:
    """The NF4 part of a QLoRA base alone: every block linear, packed, with its quantisation constants."""
    return sum(nf4_tensor_bytes(n, double_quant) for kind, n in param_tensors(shape) if kind == "linear")


def trainable_dtype_bytes(method: str, dtype_bytes: int) -> int:
    """Full fine-tuning trains the model's own parameters in its dtype (bf16 on GPU: no fp32 master copy)."""
    return dtype_bytes if method == "full" else adapter_dtype_bytes(dtype_bytes)


@lru_cache(maxsize=1024)
def optimizer_state_bytes(numels: tuple[int, ...], optimizer: str, param_bytes: int) -> int:
    """Optimizer state for the trainable tensors.

    torch AdamW (adamw_torch, adamw_torch_fused): exp_avg and exp_avg_sq created with ``zeros_like(p)`` (the
    parameter's dtype) plus an fp32 scalar ``step`` tensor per parameter. bitsandbytes 8-bit AdamW (paged or not):
    uint8 state1/state2 plus one fp32 absmax per 256-element block for each, for tensors of at least
    ``min_8bit_size`` = 4096 elements; smaller tensors keep two fp32 states; the two 256-entry fp32 quantisation
    maps are shared by all tensors. adamw_cpu_offload: same as torch AdamW in fp32, held on the host.
    """
    if optimizer in ("adamw_torch", "adamw_torch_fused"):
        return sum(2 * n * param_bytes + FP32 for n in numels)
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        total, any_8bit = 0, False
        for n in numels:
            if n >= BNB_MIN_8BIT_SIZE:
                total += 2 * n + 2 * ceil(n / BNB_8BIT_BLOCK) * FP32
                any_8bit = True
            else:
                total += 2 * n * FP32
        return total + (2 * 256 * FP32 if any_8bit else 0)
    if optimizer == "adamw_cpu_offload":
        return sum(2 * n * FP32 + FP32 for n in numels)
    raise ValueError(f"unknown optimizer {optimizer!r}")
