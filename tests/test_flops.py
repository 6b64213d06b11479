"""Each FLOPs term of onecard.plan.flops against PyTorch's own count (torch.utils.flop_counter.FlopCounterMode).

The tiny model runs with eager attention: FlopCounterMode counts its QK^T / AV as ``aten.bmm`` (the full square,
masked afterwards), the linears as ``aten.mm`` / ``aten.addmm``. Forward and backward are counted separately, so
the forward terms, the backward terms and (with checkpointing) the recompute terms are each checked on their own.
The only matmul the planner leaves out is the rotary table (inv_freq @ positions, once per model call, in
transformers releases that compute it as a matmul): the test takes out whatever FlopCounterMode counted inside the
``rotary_emb`` module, so it compares against what the installed transformers really runs.
"""

from __future__ import annotations

import pytest

from onecard.catalog.models import ModelShape
from onecard.plan.flops import ELEMENTWISE, MATMUL, attention_forward_per_token, flops_per_token

torch = pytest.importorskip("torch")

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ, RANK = 2, 24, 4


def _model_ops(counter) -> dict[str, int]:
    """FlopCounterMode's counts per op, less what it counted inside ``rotary_emb`` (whatever op computes the
    rotary table in the installed release: a matmul in transformers 5.17, a broadcast multiply in 5.24)."""
    counts = counter.get_flop_counts()
    ops = {str(k): v for k, v in counts["Global"].items()}
    for name, module_ops in counts.items():
        if name.rsplit(".", 1)[-1] == "rotary_emb":
            for op, n in module_ops.items():
                ops[str(op)] -= n
    return {k: v for k, v in ops.items() if v}


def _count(arch: str, method: str, grad_ckpt: bool, targets=ALL7):
    import peft
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    from onecard.tiny import tiny_config

    cfg = tiny_config(arch, vocab_size=320)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    if method != "full":
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, target_modules=targets, use_dora=method == "dora"))
    model.train()
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 320, (BATCH, SEQ))
    with FlopCounterMode(display=False) as fwd:
        loss = model(input_ids=ids, labels=ids).loss
    with FlopCounterMode(display=False) as bwd:
        loss.backward()

    def split(counter):
        ops = _model_ops(counter)
        linear = ops.pop("aten.mm", 0) + ops.pop("aten.addmm", 0)
        attention = ops.pop("aten.bmm", 0)
        assert not ops, f"unexpected matmul ops {ops}"
        return linear, attention

    shape = ModelShape.from_config(cfg.to_dict(), id=f"tiny-{arch}")
    return shape, split(fwd), split(bwd)


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_each_term_matches_flop_counter(method, grad_ckpt):
    shape, (fwd_linear, fwd_attn), (bwd_linear, bwd_attn) = _count("llama", method, grad_ckpt)
    est = flops_per_token(shape, method=method, seq_len=SEQ, micro_batch=BATCH, rank=RANK, targets=ALL7,
                          grad_ckpt=grad_ckpt, attention="eager")
    tokens = BATCH * SEQ

    def n(*names):
        return sum(est.term(x) for x in names) * tokens

    assert fwd_linear == pytest.approx(n("forward_matmul", "lora_forward", "dora_lora_weight"), rel=1e-9)
    assert fwd_attn == pytest.approx(n("forward_attention"), rel=1e-9)
    assert bwd_linear == pytest.approx(
        n("backward_input_grads", "backward_weight_grads", "lora_backward", "recompute_forward"), rel=1e-9)
    assert bwd_attn == pytest.approx(n("backward_attention", "recompute_attention"), rel=1e-9)
    # every matmul PyTorch ran is in some term, and the terms hold nothing PyTorch did not run
    assert fwd_linear + fwd_attn + bwd_linear + bwd_attn == pytest.approx(est.matmul_per_token * tokens)
    assert (est.term("recompute_forward") > 0) == grad_ckpt
    if method == "full":
        assert est.term("backward_weight_grads") == est.term("forward_matmul")


def test_qwen2_bias_and_gqa_lora():
    """Qwen2 (q/k/v bias -> addmm, 2 KV heads) with LoRA on attention only and checkpointing."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    shape, (fl, fa), (bl, ba) = _count("qwen2", "lora", True, targets)
    est = flops_per_token(shape, method="lora", seq_len=SEQ, micro_batch=BATCH, rank=RANK, targets=targets,
                          attention="eager")
    assert fl + fa + bl + ba == pytest.approx(est.matmul_per_token * BATCH * SEQ, rel=1e-9)


def test_frozen_embeddings_skip_first_block_input_grads():
    """Without checkpointing nothing makes the embedding output require grad: autograd skips layer 0's q/k/v dx."""
    shape, _, (bwd_linear, _) = _count("llama", "lora", False)
    est = flops_per_token(shape, method="lora", seq_len=SEQ, micro_batch=BATCH, rank=RANK, targets=ALL7,
                          grad_ckpt=False, attention="eager")
    assert est.assumptions["embeddings_need_grad"] is False
    with_emb = flops_per_token(shape, method="lora", seq_len=SEQ, micro_batch=BATCH, rank=RANK, targets=ALL7,
                               grad_ckpt=False, attention="eager", embeddings_need_grad=True)
    assert with_emb.term("backward_input_grads") > est.term("backward_input_grads")
    assert bwd_linear == pytest.approx((est.term("backward_input_grads") + est.term("lora_backward")) * BATCH * SEQ)


def test_qlora_matmuls_equal_lora_and_dequant_is_separate():
    from onecard.catalog.models import PRESETS

    shape = PRESETS["llama-3-8b"]
    lora = flops_per_token(shape, method="lora", seq_len=2048, micro_batch=1)
    qlora = flops_per_token(shape, method="qlora", seq_len=2048, micro_batch=1)
    assert qlora.matmul_per_token == lora.matmul_per_token
    dq = [t for t in qlora.terms if t.name == "qlora_dequant"][0]
    assert dq.kind == ELEMENTWISE
    # three dequantisations (forward, backward, recompute) of every base linear per micro-batch
    assert dq.flops_per_token * 2048 == pytest.approx(3 * 2.0 * 32 * shape.linear_params_per_layer())


def test_six_n_rule_and_causal_attention_on_a_real_shape():
    """Full fine-tuning without recompute is Kaplan's 6N (+ attention); causal flash attention is ~half of eager."""
    from onecard.catalog.models import PRESETS

    shape = PRESETS["llama-3-8b"]
    full = flops_per_token(shape, method="full", seq_len=2048, grad_ckpt=False)
    p_matmul = full.assumptions["p_matmul"]
    assert full.term("forward_matmul") + full.term("backward_input_grads") + full.term("backward_weight_grads") \
        == pytest.approx(6 * p_matmul)
    assert 7.4e9 < p_matmul < 7.6e9  # Llama 3 8B: 6.98B in the blocks + 0.53B LM head
    flash, eager = attention_forward_per_token(shape, 2048, "flash"), attention_forward_per_token(shape, 2048, "eager")
    assert flash / eager == pytest.approx(2049 / 4096)
    lora = flops_per_token(shape, method="lora", seq_len=2048, grad_ckpt=True)
    assert all(t.kind in (MATMUL, ELEMENTWISE) for t in lora.terms)
    # LoRA with recompute: roughly 6 P_layers (fwd, dx, recompute), well under full's 8N
    assert 4 * p_matmul < lora.total_per_token < 8 * p_matmul
    assert set(lora.as_dict()["terms"]) >= {"forward_matmul", "backward_input_grads", "recompute_forward",
                                            "forward_attention", "lora_forward", "lora_backward"}


@pytest.mark.parametrize("offloaded", [False, True])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_onecard_kernels_recompute_skips_the_down_projection_as_planned(method, offloaded):
    """With onecard's fused LoRA ops and checkpointing, PyTorch counts exactly the planner's onecard terms: the
    recompute leaves out the whole down projection (and its adapter), forward and backward are unchanged. DoRA
    adds only its expanded norm's matmuls (W A^T, A A^T, B A A^T per forward pass); its scaling is elementwise.
    Offloaded checkpoints split into halves (patch/blocks.py): the recompute also leaves out the o projection's
    frozen GEMM and lora_B (not DoRA's, which saves its output)."""
    import peft
    import transformers
    from torch.utils.flop_counter import FlopCounterMode, mm_flop

    from onecard.kernels._triton import reference_only
    from onecard.patch import apply_kernels
    from onecard.tiny import tiny_config

    cfg = tiny_config("llama", vocab_size=320)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, target_modules=ALL7, use_dora=method == "dora"))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if offloaded:
        from onecard.patch.offload import enable_offloaded_checkpointing

        enable_offloaded_checkpointing(model)
    handle = apply_kernels(model, "onecard", fused_loss=False)  # the fused loss moves the head's backward forward
    assert handle.patched.get("recompute_marks") == (None if offloaded else cfg.num_hidden_layers)
    ids = torch.randint(0, 320, (BATCH, SEQ))
    # the fused ops accumulate with in-place addmm_, which FlopCounterMode (torch 2.13) has no formula for
    inplace = {torch.ops.aten.addmm_: lambda s, a, b, *args, out_shape=None, **kw: mm_flop(a, b)}
    with reference_only():
        with FlopCounterMode(display=False, custom_mapping=inplace) as fwd:
            loss = model(input_ids=ids, labels=ids).loss
        with FlopCounterMode(display=False, custom_mapping=inplace) as bwd:
            loss.backward()
    total = sum(sum(_model_ops(c).values()) for c in (fwd, bwd))
    shape = ModelShape.from_config(cfg.to_dict(), id="tiny-llama")
    kw = dict(method=method, seq_len=SEQ, micro_batch=BATCH, rank=RANK, targets=ALL7, grad_ckpt=True, attention="eager")
    onecard = flops_per_token(shape, kernels="onecard", split_halves=offloaded, **kw)
    plain = flops_per_token(shape, **kw)
    whole = flops_per_token(shape, kernels="onecard", **kw)
    assert (onecard.matmul_per_token < whole.matmul_per_token) == (offloaded and method == "lora")
    assert total == pytest.approx(onecard.matmul_per_token * BATCH * SEQ, rel=1e-9)
    assert onecard.matmul_per_token < plain.matmul_per_token


def test_packed_rows_through_varlen_pay_attention_over_their_examples_only():
    """data.packing with onecard's kernels (varlen attention, patch/packed.py): the attention terms are an example's
    (data.mean_tokens_per_example), every other term is unchanged; other kernels run the masked attention over the
    whole row; unknown example length: the whole row."""
    from onecard.plan.inputs import flops_for_recipe
    from onecard.recipe import validate_recipe

    def recipe(packing, kernels, mean=300):
        return validate_recipe({"model": {"name_or_path": "llama-3-8b"}, "training": {"kernels": kernels},
                                "data": {"seq_len": 2048, "packing": packing, "mean_tokens_per_example": mean}})

    from onecard.catalog.models import PRESETS

    row = flops_for_recipe(recipe(False, "onecard", None))  # no mean, not packed: the whole row
    packed = flops_for_recipe(recipe(True, "onecard"))
    masked = flops_for_recipe(recipe(True, "none"))
    shape = PRESETS["llama-3-8b"]
    assert packed.term("forward_attention") == attention_forward_per_token(shape, 300)
    assert row.term("forward_attention") == attention_forward_per_token(shape, 2048)
    assert masked.term("forward_attention") == row.term("forward_attention")
    for name in ("forward_matmul", "backward_input_grads", "lora_forward", "recompute_forward"):
        assert packed.term(name) == row.term(name)
    assert flops_for_recipe(recipe(True, "onecard", None)).term("forward_attention") == row.term("forward_attention")
