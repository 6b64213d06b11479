"""FLOPs per trained token, by method, one term at a time (pure Python; no torch).

A "token" is one position of a micro-batch (padding included), the unit ``tokens/s`` is quoted in.
Every term is a count of multiply-adds x 2 (one FLOP each), the convention of Kaplan et al. 2020
("Scaling Laws for Neural Language Models", sec. 2.1: C_forward ~= 2N per token, training ~= 6N) and of
PyTorch's ``torch.utils.flop_counter`` -- tests/test_flops.py checks each term against that counter
on tiny models.

Notation: for one decoder block, P_block = sum of its nn.Linear weights (q, k, v, o, gate, up, down);
P_layers = n_layers x P_block; P_head = vocab x hidden (the LM head matmul happens even when tied to the
embeddings); P_matmul = P_layers + P_head. Embeddings are lookups (0 FLOPs). P_lora = sum over targeted
linears of r x (in + out).

Terms (per token):
- forward_matmul = 2 P_matmul.
- forward_attention: per layer, QK^T and AV each cost 2 s d_q per query for s keys (d_q = heads x head_dim;
  GQA repeats K/V, so query heads count). A causal flash kernel skips the masked triangle: a query at position
  i sees i+1 keys, (s+1)/2 on average, so 2 x 2 x d_q x (s+1)/2 = 2 d_q (s+1) per token per layer.
  Eager attention computes the full square and masks it afterwards: 4 d_q s.
- backward_input_grads = 2 P_matmul: every linear needs dL/dx so the gradient reaches the layers below --
  except the first block's q/k/v when the embeddings are frozen (their input needs no gradient; autograd
  skips it). transformers' gradient_checkpointing_enable() calls enable_input_require_grads(), which loses that
  skip (2 h (q + 2 kv) more per token): the default follows it.
- backward_weight_grads = 2 P_matmul for full fine-tuning (Kaplan's 6N = 2N + 2N + 2N); 0 for adapters.
- backward_attention: flash backward recomputes QK^T and does four more products (dV, dP, dQ, dK): 2.5x the
  causal forward (FlashAttention-2 paper, Dao 2023, sec. 3.1; the same five bmms as PyTorch's
  ``sdpa_backward_flop_count``). Eager backward: 2x its forward (four matmuls against its two).
- lora_forward = 2 P_lora; lora_backward = 2 P_lora (input grads) + 2 P_lora (A and B weight grads), less the
  first block's q/k/v lora_A input grads when the embeddings are frozen.
- recompute_forward (gradient checkpointing, one checkpoint per decoder block as transformers does it): the
  decoder blocks run forward again during backward -- 2 P_layers + their attention + their LoRA -- but not the
  LM head (outside the checkpoints) nor each block's last projection (torch's checkpoint early stop: see
  _recompute_skipped_per_layer). Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", sec. 5) put full recomputation at 8N vs 6N per token; this is that extra forward.
- dora_lora_weight (matmul, per step): peft 0.21 DoRA builds B A by pushing an identity through the adapter,
  lora_B(lora_A(eye(in))) -- 2 in^2 r + 2 in r out FLOPs per targeted linear per forward, no backward (the
  result is detached), again under recompute. Divided by the micro-batch's tokens.
- dora_norm (elementwise, per step): ||W + s B A||_c, about 3 in x out FLOPs per target per forward (add,
  square, sum) on CUDA cores, memory-bound (it reads W). Not counted by FlopCounterMode (not a matmul).
- onecard's fused DoRA (kernels onecard) instead: dora_norm (matmul) = W A^T, A A^T and B (A A^T) per target per
  forward pass, 2 in out r + 2 r^2 (in + out) (the expanded norm, kernels/lora_linear.py dora_norm), and dora_scale (elementwise) = the row-scaled W, in x out
  per target in forward, recompute and backward; no B A product.
- dora_dropout_base (only with adapter.dropout > 0): peft then recomputes the base linear on the dropped-out
  input, 2 P_targets forward + 2 P_targets input grads.
- qlora_dequant (elementwise, per step): bitsandbytes dequantises every NF4 base linear before each matmul that
  uses it: forward, backward (input grads) and recompute. ~2 ops per weight (table lookup, scale multiply),
  memory-bound; its bytes are in onecard.plan.speed.

What this leaves out (all elementwise, a few % of the matmul FLOPs at 7B+): norms, rotary, activations, softmax,
residual adds, cross-entropy, optimizer arithmetic. The 6N rule's own caveat (Kaplan et al. 2020, Table 1) and
PaLM appendix B (Chowdhery et al. 2022) -- the basis of nanoGPT's MFU estimate -- ignore the same work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from onecard.catalog.families import kernels_for
from onecard.catalog.models import ModelShape

MATMUL, ELEMENTWISE = "matmul", "elementwise"
DEQUANT_OPS_PER_PARAM = 2.0  # NF4: 4-bit index -> code-book lookup, x absmax (Dettmers et al. 2023, sec. 3)
DORA_NORM_OPS_PER_PARAM = 3.0  # W + s*BA, square, sum (the sqrt is per column)


@dataclass(frozen=True)
class FlopsTerm:
    name: str
    flops_per_token: float
    kind: str        # MATMUL (tensor cores; FlopCounterMode counts it) or ELEMENTWISE (CUDA cores)
    phase: str       # forward | backward (recompute happens during backward)
    formula: str


@dataclass(frozen=True)
class FlopsBreakdown:
    terms: tuple[FlopsTerm, ...]
    seq_len: int
    tokens_per_microbatch: int
    assumptions: dict = field(default_factory=dict)

    @property
    def total_per_token(self) -> float:
        return sum(t.flops_per_token for t in self.terms)

    @property
    def matmul_per_token(self) -> float:
        return sum(t.flops_per_token for t in self.terms if t.kind == MATMUL)

    def term(self, name: str) -> float:
        return sum(t.flops_per_token for t in self.terms if t.name == name)

    def as_dict(self) -> dict:
        return {
            "total_flops_per_token": self.total_per_token,
            "matmul_flops_per_token": self.matmul_per_token,
            "seq_len": self.seq_len,
            "tokens_per_microbatch": self.tokens_per_microbatch,
            "terms": {t.name: {"flops_per_token": t.flops_per_token, "kind": t.kind, "phase": t.phase,
                               "formula": t.formula} for t in self.terms},
            "assumptions": dict(self.assumptions),
        }


def _targeted(shape: ModelShape, targets: Iterable[str] | None) -> list[tuple[str, int, int]]:
    names = None if targets is None else set(targets)
    return [(n, i, o) for n, i, o in shape.linear_layers_per_block() if names is None or n in names]


def attention_forward_per_token(shape: ModelShape, seq_len: int, kernel: str = "flash") -> float:
    """QK^T + AV FLOPs per token of a sequence of ``seq_len``, all layers (see module docstring)."""
    per_layer = 2.0 * shape.q_dim * (seq_len + 1) if kernel == "flash" else 4.0 * shape.q_dim * seq_len
    return shape.num_hidden_layers * per_layer


def flops_per_token(
    shape: ModelShape,
    *,
    method: str,
    seq_len: int,
    micro_batch: int = 1,
    rank: int = 16,
    targets: Iterable[str] | None = None,
    grad_ckpt: bool = True,
    attention: str = "flash",
    embeddings_need_grad: bool | None = None,
    lora_dropout: float = 0.0,
    kernels: str = "none",
    split_halves: bool = False,
    attention_span: int | None = None,
    uncheckpointed_layers: int = 0,
) -> FlopsBreakdown:
    """The FLOPs of one trained token for ``method`` in lora | qlora | dora | full (terms in the module docstring).

    ``attention``: "flash" (causal kernels: sdpa on GPU, flash_attention_2, flex) or "eager" (full square).
    ``embeddings_need_grad``: default True for full fine-tuning (trainable embeddings) and under checkpointing
    (transformers makes the embedding output require grad then); False otherwise.
    ``kernels``: "onecard" changes what the checkpoint's recompute runs (_recompute_skipped_per_layer), and so do
    ``split_halves`` (offloaded checkpoints per half-layer, PlanInputs.split_halves).
    ``attention_span``: the sequence the attention runs over when shorter than ``seq_len`` -- packed rows through
    varlen attention attend within their example only (:func:`varlen_span`).
    ``uncheckpointed_layers``: under ``grad_ckpt``, the last layers left out of the checkpoints (no recompute).
    """
    if method not in ("lora", "qlora", "dora", "full"):
        raise ValueError(f"unknown method {method!r}")
    adapter = method != "full"
    # transformers 5.17's gradient_checkpointing_enable() calls enable_input_require_grads(): under checkpointing
    # the embeddings' output requires grad, so the first block's input grads are computed after all.
    emb_grad = (not adapter or grad_ckpt) if embeddings_need_grad is None else embeddings_need_grad
    tokens_mb = micro_batch * seq_len
    h, layers = shape.hidden_size, shape.num_hidden_layers
    p_layers = layers * shape.linear_params_per_layer()
    p_head = shape.vocab_size * h
    p_matmul = p_layers + p_head
    tgt = _targeted(shape, targets) if adapter else []
    p_lora = layers * sum(rank * (i + o) for _, i, o in tgt)
    first_qkv = 0 if emb_grad else h * (shape.q_dim + 2 * shape.kv_dim)
    first_lora_a = 0 if emb_grad else sum(rank * i for n, i, _ in tgt if n in ("q_proj", "k_proj", "v_proj"))
    attn_fwd = attention_forward_per_token(shape, min(seq_len, attention_span or seq_len), attention)
    attn_bwd_factor = 2.5 if attention == "flash" else 2.0

    terms = [
        FlopsTerm("forward_matmul", 2.0 * p_matmul, MATMUL, "forward", "2 x (P_layers + P_head)"),
        FlopsTerm("forward_attention", attn_fwd, MATMUL, "forward",
                  "L x 2 d_q (s+1) causal flash" if attention == "flash" else "L x 4 d_q s eager"),
        FlopsTerm("backward_input_grads", 2.0 * (p_matmul - first_qkv), MATMUL, "backward",
                  "2 x P_matmul" + ("" if emb_grad else " - first block's q/k/v (frozen embeddings)")),
        FlopsTerm("backward_weight_grads", 0.0 if adapter else 2.0 * p_matmul, MATMUL, "backward",
                  "0 (frozen base)" if adapter else "2 x P_matmul"),
        FlopsTerm("backward_attention", attn_bwd_factor * attn_fwd, MATMUL, "backward",
                  f"{attn_bwd_factor} x forward_attention"),
    ]
    if adapter:
        terms += [
            FlopsTerm("lora_forward", 2.0 * p_lora, MATMUL, "forward", "2 x P_lora, P_lora = L x sum r (in + out)"),
            FlopsTerm("lora_backward", 4.0 * p_lora - 2.0 * first_lora_a, MATMUL, "backward",
                      "2 x P_lora input grads + 2 x P_lora weight grads"),
        ]
    recomputed = max(0, layers - uncheckpointed_layers) / layers if grad_ckpt else 0.0  # share of layers
    passes = 1 + recomputed  # forward passes over the decoder blocks, per layer on average
    peft_dora = method == "dora" and kernels != "onecard"
    eye = layers * sum(2.0 * i * i * rank + 2.0 * i * rank * o for _, i, o in tgt) if peft_dora else 0.0
    if recomputed:
        skipped, what = _recompute_skipped_per_layer(shape, method, tgt, rank, kernels, split_halves)
        share = "" if recomputed == 1 else f" x {recomputed:.3g} (the checkpointed layers' share)"
        per_pass = 2.0 * (p_layers + p_lora - layers * skipped) + eye / tokens_mb
        terms += [
            FlopsTerm("recompute_forward", recomputed * per_pass, MATMUL, "backward",
                      f"2 x (P_layers + P_lora - L x {what}) (+ DoRA's B A per step){share}: blocks only, not the LM "
                      "head; torch stops before each block's last matmul"),
            FlopsTerm("recompute_attention", recomputed * attn_fwd, MATMUL, "backward",
                      f"forward_attention again{share}"),
        ]
    if method == "dora" and not peft_dora:
        w_a = layers * sum(2.0 * i * o * rank + 2.0 * rank * rank * (i + o) for _, i, o in tgt)  # + A A^T, B (A A^T)
        scale = layers * sum(i * o for _, i, o in tgt)
        terms += [
            FlopsTerm("dora_norm", passes * w_a / tokens_mb, MATMUL, "forward",
                      "passes x L x sum (2 in out r + 2 r^2 (in + out)) / tokens per micro-batch (W A^T, A A^T and "
                      "B (A A^T) of onecard's expanded norm)"),
            FlopsTerm("dora_scale", (passes + 1) * scale / tokens_mb, ELEMENTWISE, "forward",
                      "(fwd + recompute + bwd) x L x sum in out / tokens (the row-scaled W of onecard's DoRA)"),
        ]
    elif method == "dora":
        norm = layers * sum(DORA_NORM_OPS_PER_PARAM * i * o for _, i, o in tgt)
        terms += [
            FlopsTerm("dora_lora_weight", eye / tokens_mb, MATMUL, "forward",
                      "L x sum (2 in^2 r + 2 in r out) / tokens per micro-batch (lora_B(lora_A(eye)))"),
            FlopsTerm("dora_norm", passes * norm / tokens_mb, ELEMENTWISE, "forward",
                      f"passes x L x sum {DORA_NORM_OPS_PER_PARAM:g} in out / tokens per micro-batch"),
        ]
        if lora_dropout > 0:
            p_tgt = layers * sum(i * o for _, i, o in tgt)
            terms.append(FlopsTerm("dora_dropout_base", 2.0 * p_tgt * (passes + 1), MATMUL, "forward",
                                   "peft recomputes the base linear on dropped-out input: fwd (+recompute) + bwd"))
    if method == "qlora":
        dequants = passes + 1  # forward, backward input grads, recompute
        terms.append(FlopsTerm("qlora_dequant", dequants * DEQUANT_OPS_PER_PARAM * p_layers / tokens_mb, ELEMENTWISE,
                               "forward", f"(fwd + bwd + recompute) x {DEQUANT_OPS_PER_PARAM:g} ops x P_layers / tokens"))
    return FlopsBreakdown(
        tuple(terms), seq_len, tokens_mb,
        assumptions={"method": method, "attention": attention, "grad_ckpt": grad_ckpt, "rank": rank if adapter else None,
                     "targets": [n for n, _, _ in tgt], "embeddings_need_grad": emb_grad,
                     "p_matmul": p_matmul, "p_layers": p_layers, "p_lora": p_lora},
    )


def _recompute_skipped_per_layer(shape: ModelShape, method: str, tgt, rank: int,
                                 kernels: str = "none", split_halves: bool = False) -> tuple[int, str]:
    """Weights per block whose matmul the recompute does *not* re-run, and a label.

    torch.utils.checkpoint (non-reentrant, early stop on by default) re-runs a block only until every tensor the
    backward needs is back; the block's final projection feeds only the residual add, so it is skipped: the base
    down_proj (or, when down_proj carries LoRA, its lora_B -- the base runs because lora_A after it saves x).
    peft's DoRA: its final elementwise scale saves the LoRA output, so nothing is skipped. Measured with
    FlopCounterMode on tiny llama models (tests/test_flops.py) with torch 2.13 / transformers 5.17 / peft 0.21.
    onecard's fused MLP skips the down projection's base and lora_B matmuls in the recompute (patch/recompute.py),
    in families whose MLP output goes straight into the residual; a DoRA down projection too (its output, needed
    for the magnitude's gradient, is kept from the first forward: kernels/lora_mlp.py).
    """
    down = [(i, o) for n, i, o in tgt if n == "down_proj"]
    if kernels == "onecard" and _mlp_feeds_residual(shape):
        lora_b = rank * down[0][1] if down else 0  # h A_d^T moved from the recompute to backward: same count
        skipped = shape.intermediate_size * shape.hidden_size + lora_b
        if split_halves and not (method == "dora" and any(n == "o_proj" for n, _, _ in tgt)):
            # the attention half's recompute ends at the o projection: its frozen GEMM and lora_B are skipped (its
            # lora_A still runs: x A^T is saved); a DoRA o projection saves its output, so it runs
            o_lora_b = rank * shape.hidden_size if any(n == "o_proj" for n, _, _ in tgt) else 0
            return (skipped + shape.q_dim * shape.hidden_size + o_lora_b,
                    "P_down + P_o (+ their lora_B; onecard's fused MLP and o projection, split halves)")
        return skipped, "P_down (+ its lora_B; onecard's fused MLP)"
    if method == "dora":
        return 0, "0"
    if down:
        return rank * down[0][1], "r x hidden (down_proj lora_B)"
    return shape.intermediate_size * shape.hidden_size, "P_down"


def _mlp_feeds_residual(shape: ModelShape) -> bool:
    spec = kernels_for(shape.model_type)  # which families get the recompute skip
    return spec is not None and spec.mlp_feeds_residual


def varlen_span(example_tokens: int | None, kernels: str) -> int | None:
    """Tokens a packed row's attention spans. With onecard's kernels on a CUDA card (every catalog card), packed rows
    go through varlen attention (patch/packed.py), each example attending within itself: the attention term is that
    of an example, not of the whole row. The exact span is the token-weighted mean example length (sum L^2 / sum L);
    only the mean is known, which is exact for equal lengths and low otherwise. Other kernels run the dense masked
    attention over the whole row: None."""
    return example_tokens if kernels == "onecard" else None


def flops_for_inputs(inp, *, seq_len: int | None = None, grad_ckpt: bool | None = None,
                     method: str | None = None) -> FlopsBreakdown:
    """:func:`flops_per_token` for resolved planner inputs (:class:`onecard.plan.inputs.PlanInputs`): its kernels,
    targets, split halves and packed span. ``seq_len`` / ``grad_ckpt`` / ``method`` override for what-ifs."""
    ckpt = inp.grad_ckpt if grad_ckpt is None else grad_ckpt
    return flops_per_token(inp.shape, method=method or inp.method, seq_len=seq_len or inp.seq_len,
                           micro_batch=inp.micro_batch, rank=inp.rank, targets=inp.targets, grad_ckpt=ckpt,
                           attention="eager" if inp.attn == "eager" else "flash", lora_dropout=inp.lora_dropout,
                           kernels=inp.kernels, split_halves=ckpt and inp.split_halves,
                           attention_span=varlen_span(inp.packed_example_tokens, inp.kernels),
                           uncheckpointed_layers=inp.uncheckpointed_layers if ckpt else 0)
