"""Activation, logits/cross-entropy and workspace terms: documented formulas, to be calibrated by measurement.

Unlike plan/static.py these are *estimates*. Each function derives its bytes from what autograd saves for the
backward pass (the approach of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", sec. 4.1, redone for Llama-style blocks: RMSNorm, RoPE, GQA, SwiGLU, frozen base weights with LoRA).
Assumptions, stated so measurements can correct them:
- no padding mask (packed or equal-length batches): SDPA takes its flash / memory-efficient path with
  ``enable_gqa`` (transformers' use_gqa_in_sdpa), so K/V are saved at their GQA size and no seq^2 term exists;
- LoRA dropout 0 (peft uses nn.Identity: no mask, no copy); no autocast (onecard trains a bf16 model directly);
- a frozen nn.Linear saves nothing (grad wrt input needs only its weight); a trainable one saves its input.
Units: bytes per token per decoder layer unless the name says otherwise.
"""

from __future__ import annotations

from onecard.catalog.models import ModelShape

BF16 = 2
FP32 = 4


def _lora_inputs(shape: ModelShape, targets, *, shared: bool, elem_bytes: int) -> int:
    """Inputs the adapter matmuls save (lora_A's grad needs its input x).

    Plain peft with fp32 adapters on a bf16 base casts x to fp32 *per target* (LoraLayer._cast_input_dtype), so
    q, k and v each save their own fp32 copy of the same normed hidden state. A fused LoRA kernel saves the bf16
    input once per distinct input (qkv share one, gate/up share one).
    """
    layers = {name: n_in for name, n_in, _ in shape.linear_layers_per_block()}
    if not shared:
        return elem_bytes * sum(layers[t] for t in targets if t in layers)
    groups = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
    return elem_bytes * sum(layers[g[0]] for g in groups if any(t in targets for t in g))


ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def layer_activation_parts_per_token(shape: ModelShape, *, method: str, targets, rank: int, kernels: str,
                                     attn: str, seq_len: int, act_bytes: int = BF16) -> dict[str, int]:
    """Bytes one decoder block saves for backward, per token of the micro-batch, by half: ``attention`` (input
    norm, attention, q/k/v/o adapters) and ``mlp`` (post-attention norm, MLP, gate/up/down adapters). Offloaded
    checkpoints of onecard-patched layers recompute one half at a time (patch/blocks.py).

    Plain transformers (kernels none), per block:
    - RMSNorm x2: ``hidden.to(float32)`` is saved by ``pow`` and by the ``* rsqrt`` multiply: 4h each (+2h for the
      bf16 normed output when the norm weight trains, i.e. full fine-tuning);
    - attention (SDPA flash/efficient or FlashAttention 2): rotated q, k, v and the output in bf16, plus the fp32
      log-sum-exp per head; eager attention instead saves q, GQA-repeated k and v, and the seq x seq scores twice
      (fp32 softmax output and its bf16 copy): heads * seq * 6 bytes per token -- the seq^2 term;
    - SwiGLU MLP: silu saves gate, the product saves silu(gate) and up: 3 x i bf16;
    - trainable linears: full fine-tuning saves each distinct input in bf16; LoRA saves its inputs (see
      _lora_inputs) and the rank-r output of lora_A (fp32) for lora_B's grad; DoRA also saves the base output and
      the lora_B output per target (bf16 + fp32) for the magnitude rescale.
    onecard / liger kernels: fused RMSNorm saves the bf16 input and an fp32 rstd; fused SwiGLU saves gate and up and
    recomputes silu. onecard's LoRA projections save each distinct bf16 input once; liger leaves LoRA to peft.
    ``act_bytes`` (bench calibration): element size of the residual stream. QLoRA after
    prepare_model_for_kbit_training has fp32 embeddings and norm weights, so hidden states are fp32 and
    bitsandbytes' Linear4bit returns its output in the input's dtype: q/k/v/o and the MLP run in fp32 (4 bytes).
    Measured on the H200 (Llama 3 8B QLoRA, seq 512 x 8, no checkpointing): 65.7 GiB allocated against 50.0
    planned with bf16 activations.
    """
    h, i, heads = shape.hidden_size, shape.intermediate_size, shape.num_attention_heads
    q, kv = shape.q_dim, shape.kv_dim
    full = method == "full"
    fused_norm = kernels in ("onecard", "liger")
    norm = (BF16 * h + FP32) if fused_norm else (FP32 * h + (BF16 * h if full else 0))
    if attn == "eager":
        attention = act_bytes * 3 * q + 6 * heads * seq_len
    else:
        attention = act_bytes * (q + 2 * kv) + act_bytes * q + FP32 * heads
    mlp = act_bytes * (2 if fused_norm else 3) * i
    trainable = {half: _trainable_bytes_per_token(shape, method, targets, rank, kernels, half)
                 for half in ("attention", "mlp")}
    return {"attention": norm + attention + trainable["attention"], "mlp": norm + mlp + trainable["mlp"]}


def _trainable_bytes_per_token(shape: ModelShape, method: str, targets, rank: int, kernels: str, half: str) -> int:
    """What the trained linears of one half save: ``targets`` of that half (adapters), or all its linears (full)."""
    if method == "full":
        targets = ("q_proj", "o_proj", "gate_proj", "down_proj")  # one per distinct input
    targets = [t for t in targets if (t in ATTENTION_TARGETS) == (half == "attention")]
    fused_lora = kernels == "onecard"
    # onecard's fused MLP saves x, gate and up only: the GLU backward rebuilds the down projection's input h, and
    # h A_d^T from it (kernels/lora_mlp.py). Measured without checkpointing (Llama 3 8B, H200, b1 to b4): ~115 KB per
    # token and layer against 148 planned with h counted (bench/results/e2e/probe_llama3-8b_s4_2026-11-28.json).
    saving = [t for t in targets if not (fused_lora and t == "down_proj")]
    if method == "full":
        return _lora_inputs(shape, saving, shared=True, elem_bytes=BF16)
    trainable = _lora_inputs(shape, saving, shared=fused_lora, elem_bytes=BF16 if fused_lora else FP32)
    rank_bytes = BF16 if fused_lora else FP32  # x A^T: in the compute dtype in onecard's ops, fp32 in peft's
    trainable += rank_bytes * rank * sum(1 for name, _, _ in shape.linear_layers_per_block() if name in saving)
    if method == "dora" and fused_lora:  # onecard's fused DoRA saves each projection's output for dm (the
        # down projection's on ctx); gate/up's outputs are saved anyway (kernels/lora_mlp.py), so only the others add
        trainable += BF16 * sum(n_out for name, _, n_out in shape.linear_layers_per_block()
                                if name in targets and name not in ("gate_proj", "up_proj"))
    elif method == "dora":
        outs = sum(n_out for name, _, n_out in shape.linear_layers_per_block() if name in targets)
        trainable += (BF16 + FP32) * outs
    return trainable


def checkpoint_bytes_per_token(shape: ModelShape, act_bytes: int = BF16, dora_down_kept: bool = False) -> int:
    """With gradient checkpointing each block keeps only its input hidden state (bf16; fp32 for upcast QLoRA).
    ``dora_down_kept``: onecard's fused DoRA MLP also keeps its down projection's output (hidden, bf16) from the
    first forward for the magnitude's gradient, so the recompute can skip that GEMM (kernels/lora_mlp.py)."""
    return act_bytes * shape.hidden_size + (BF16 * shape.hidden_size if dora_down_kept else 0)


def backward_transient_bytes_per_token(shape: ModelShape, act_bytes: int = BF16, kernels: str = "none") -> int:
    """Gradient tensors alive at once inside one block's backward: the residual-stream grad (h) and, at the MLP,
    the grads of gate, up and their product (3 x i), all bf16. A rough upper envelope; calibrate against traces.
    onecard's fused MLP writes h, dg and du over dh, g and u (kernels/glu.py ``inplace``): only dh (i) is new."""
    mlp = 1 if kernels == "onecard" else 3
    return act_bytes * (2 * shape.hidden_size + mlp * shape.intermediate_size)


def head_activation_bytes_per_token(shape: ModelShape, kernels: str, act_bytes: int = BF16) -> int:
    """Outside the blocks: the final RMSNorm (fp32 input, or bf16 + rstd fused) and the lm_head input (bf16)."""
    h = shape.hidden_size
    return (act_bytes * h + FP32 if kernels in ("onecard", "liger") else FP32 * h) + act_bytes * h


def ce_chunk_tokens(tokens: int, shape: ModelShape) -> int:
    """Chunk size of a fused linear cross-entropy: liger-kernel's heuristic (ops/fused_linear_cross_entropy.py),
    next_power_of_2(tokens / ceil(vocab / hidden)), which keeps a logits chunk about the size of the hidden states."""
    inc = -(-shape.vocab_size // shape.hidden_size)
    chunk = max(1, -(-tokens // inc))
    return 1 << (chunk - 1).bit_length()


def logits_ce_bytes(shape: ModelShape, tokens: int, *, fused_ce: bool, logits_bytes: int = BF16,
                    hold_logits: bool = True, in_place: bool = False) -> int:
    """Peak bytes of the LM head + cross-entropy for ``tokens`` tokens, at its worst moment (start of backward).

    Unfused (transformers' ForCausalLMLoss): the lm_head writes logits (T x V, model dtype); the loss upcasts them
    with ``logits.float()`` and ``cross_entropy`` saves its fp32 log_softmax (T x V x 4). In backward, nll_loss's
    grad is a dense fp32 T x V tensor and log_softmax's grad another: at that moment the fp32 log_softmax, both
    grads and the held logits coexist -> 12 T V + logits. (When logits are already fp32, as after
    prepare_model_for_kbit_training upcasts lm_head, ``.float()`` is free but the logits themselves are fp32.)
    Fused/chunked: one chunk of logits (bf16) and its fp32 grad at a time, plus the T x h grad of the hidden
    states the kernel accumulates and fp32 per-token lse and loss. ``in_place``: onecard's Triton CE kernel writes
    the chunk's gradient over its bf16 logits (kernels/fused_ce.py), so no fp32 copy.
    """
    v = shape.vocab_size
    if fused_ce:
        chunk = min(tokens, ce_chunk_tokens(tokens, shape))
        return chunk * v * (BF16 if in_place else BF16 + FP32) + tokens * (BF16 * shape.hidden_size + 2 * FP32)
    held = logits_bytes * tokens * v if hold_logits else 0
    return held + 3 * FP32 * tokens * v


def workspace_bytes(shape: ModelShape, method: str, targets, kernels: str = "none") -> int:
    """cuBLAS/cuBLASLt workspace (torch allocates it from its caching allocator: 32 MiB on Hopper, less elsewhere)
    plus matmul temporaries; DoRA also materialises W + s*B@A (fp32, out x in) of the largest target in forward to
    take its column norm (peft lora/dora.py get_weight_norm), a transient the size of that weight. onecard's fused
    DoRA materialises the row-scaled (m/n) W in bf16 instead (kernels/lora_linear.py dora_weights), one target's
    at a time, and no fp32 copy (its norm is expanded: dora_norm)."""
    ws = 64 * 2**20
    if method == "dora" and kernels == "onecard":
        ws += max((BF16 * n_in * n_out for name, n_in, n_out in shape.linear_layers_per_block() if name in targets),
                  default=0)
    elif method == "dora":
        ws += max((FP32 * n_in * n_out for name, n_in, n_out in shape.linear_layers_per_block() if name in targets),
                  default=0) * 2
    return ws
