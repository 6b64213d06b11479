"""Packed rows through onecard's attention: dispatch to varlen, once-per-forward cache, no cross-contamination.

CPU: the normal path runs (varlen is CUDA-only), and the varlen branch itself is exercised by swapping
``packed_varlen_attention`` for the explicit-mask reference, so its reshapes and layouts are checked
against transformers' dense path. Tolerance fp32: loss 1e-5 relative, gradients 1e-4 relative L2.
GPU (``gpu`` marker): bf16 tiny llama + LoRA, varlen vs the dense mask, loss and every LoRA gradient at 2e-2.
"""

import inspect

import _kernel_env  # noqa: F401
import pytest
import torch
from _kernel_env import rel_err

from onecard.data.collate import collate, model_inputs
from onecard.data.packing import pack_examples
from onecard.kernels import packing
from onecard.kernels._triton import reference_only
from onecard.patch import apply_kernels, packed

LENGTHS = [7, 5, 9, 4, 6, 3]  # packed into rows of 16: [7, 5], [9, 4], [6, 3] (+ pads)
SEQ = 16


@pytest.fixture(autouse=True)
def _fast_cpu_kernels():
    """Wiring tests: torch references instead of the Triton interpreter on CPU (as test_patch_families)."""
    if torch.cuda.is_available():
        yield
    else:
        with reference_only():
            yield


@pytest.fixture()
def force_varlen(monkeypatch):
    """Take the varlen branch on CPU fp32, with the reference doing the attention; records calls."""
    calls = []

    def fake_varlen(q, k, v, position_ids, scale=None, seqlens=None):
        assert seqlens is not None and seqlens[0].dtype == torch.int32
        calls.append(seqlens)
        return packing.packed_attention_reference(q, k, v, position_ids, scale=scale)

    monkeypatch.setattr(packed, "tensors_supported", lambda q: True)
    monkeypatch.setattr(packing, "packed_varlen_attention", fake_varlen)
    return calls


def _examples(vocab=300, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        labels = list(ids)
        labels[:2] = [-100, -100]  # a prompt
        out.append({"input_ids": ids, "labels": labels})
    return out


def _packed_batch(examples):
    rows = pack_examples(examples, SEQ)
    assert len(rows) == 3
    batch = collate(rows, pad_id=0)
    return model_inputs(batch) | {"labels": batch["labels"]}


def _model(arch="llama", lora=False, seed=0, dtype=torch.float32, device="cpu", **overrides):
    import transformers

    from onecard.tiny import tiny_config

    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=300, intermediate_size=96, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    model.train()
    apply_kernels(model)
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _packed_loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), _grads(model)


def _one_by_one_loss_and_grads(model, examples):
    """The same examples run alone (no packing, no mask): the loss over all their label tokens."""
    model.zero_grad()
    counts = [sum(lab != -100 for lab in ex["labels"][1:]) for ex in examples]
    total = 0.0
    for ex, count in zip(examples, counts):
        out = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]))
        total = total + out.loss * count
    loss = total / sum(counts)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_same(a, b, what):
    (loss_a, g_a), (loss_b, g_b) = a, b
    assert rel_err(loss_a, loss_b) <= 1e-5, f"{what}: loss {loss_a} vs {loss_b}"
    assert g_a.keys() == g_b.keys() and g_a
    for name in g_a:
        assert rel_err(g_a[name], g_b[name]) <= 1e-4, f"{what}: grad {name}"


# --- dispatch decisions -------------------------------------------------------------------------


class _Module:
    is_causal = True


def _qkv(seq=SEQ, bsz=2, hq=4, hkv=2, dim=8, dtype=torch.float32):
    torch.manual_seed(0)
    return (torch.randn(bsz, hq, seq, dim, dtype=dtype), torch.randn(bsz, hkv, seq, dim, dtype=dtype),
            torch.randn(bsz, hkv, seq, dim, dtype=dtype))


def _positions(rows):
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])


def _hf_mask(position_ids, attention_mask=None, impl="sdpa", sliding_window=None):
    """The 4-D mask transformers 5.17 hands the attention layers."""
    import transformers
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    cfg = transformers.MistralConfig(hidden_size=8, num_attention_heads=1, sliding_window=sliding_window)
    cfg._attn_implementation = impl
    embeds = torch.zeros(*position_ids.shape, 8)
    make = create_causal_mask if sliding_window is None else create_sliding_window_causal_mask
    cache = "cache" if "cache" in inspect.signature(make).parameters else "past_key_values"  # 5.24 / 5.17
    return make(config=cfg, inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                **{cache: None})


def _dispatch(position_ids, mask, dropout=0.0, past=None, **kwargs):
    """'varlen' or 'normal': which path one attention call takes."""
    taken = []

    def normal(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kw):
        taken.append("normal")
        return q.transpose(1, 2), None

    q, k, v = _qkv(bsz=position_ids.shape[0])
    fn = packed.packed_attention_or(normal, past)
    if fn is normal:
        return "untouched"
    out, weights = fn(_Module(), q, k, v, mask, dropout=dropout, scaling=0.5, position_ids=position_ids, **kwargs)
    assert weights is None and out.shape == (q.shape[0], SEQ, q.shape[1], q.shape[3])
    return taken[0] if taken else "varlen"


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_rows_with_transformers_mask_take_varlen(force_varlen, impl):
    pos = _positions([[7, 9], [16]])
    assert _dispatch(pos, _hf_mask(pos, impl=impl)) == "varlen"
    cu, longest = force_varlen[0]
    assert cu.tolist() == [0, 7, 16, 32] and longest == 16


def test_what_keeps_the_normal_path(force_varlen):
    packed_pos = _positions([[7, 9], [16]])
    plain_pos = _positions([[16], [16]])
    padding = torch.ones(2, SEQ, dtype=torch.long)
    padding[0, 12:] = 0
    doc_mask = _hf_mask(packed_pos)
    assert _dispatch(plain_pos, _hf_mask(plain_pos, impl="eager")) == "normal"  # no restarts: plain causal
    assert _dispatch(packed_pos, None) == "normal"  # sdpa's is_causal path
    # a 2-D padding mask: transformers ignores the restarts, so must we (the mask is not the document one)
    assert _dispatch(packed_pos, _hf_mask(packed_pos, attention_mask=padding)) == "normal"
    assert _dispatch(packed_pos, doc_mask, dropout=0.1) == "normal"
    assert _dispatch(packed_pos, doc_mask, past=object()) == "untouched"  # generation
    assert _dispatch(packed_pos[:, :8], doc_mask) == "normal"  # shapes disagree
    assert not force_varlen


def test_sliding_window_shorter_than_an_example_keeps_the_normal_path(force_varlen):
    pos = _positions([[7, 9], [16]])
    assert _dispatch(pos, _hf_mask(pos, sliding_window=8), sliding_window=8) == "normal"
    wide = _hf_mask(pos, sliding_window=16)
    assert _dispatch(pos, wide, sliding_window=16) == "varlen"
    pos2 = _positions([[7, 9], [8, 8]])
    assert _dispatch(pos2, _hf_mask(pos2, sliding_window=9), sliding_window=9) == "varlen"


def test_only_cuda_half_tensors_are_supported():
    q = torch.randn(1, 2, 4, 8)
    assert not packed.tensors_supported(q)
    assert not packed.tensors_supported(q.bfloat16())  # varlen_attn is FlashAttention: CUDA only
    if torch.cuda.is_available():
        assert packed.tensors_supported(q.cuda().bfloat16()) == packed.varlen_available()
        assert not packed.tensors_supported(q.cuda())


def test_info_computed_once_per_tensor_pair_and_again_after_in_place_change():
    pos = _positions([[7, 9], [16]])
    mask = _hf_mask(pos)
    before = packed.computations
    first = packed.packed_info(pos, mask, 2)
    assert packed.packed_info(pos, mask, 2) is first and packed.computations == before + 1
    again = packed.packed_info(pos.clone(), mask, 2)  # an equal tensor: recomputed, same answer
    assert again is not first and torch.equal(again.cu_seqlens, first.cu_seqlens)
    pos[1, 8:] = torch.arange(8)
    assert packed.packed_info(pos, mask, 2).mask_is_document_causal is False
    assert packed.computations == before + 3


# --- whole models -------------------------------------------------------------------------------


def test_packed_batch_equals_examples_run_one_by_one():
    model = _model(lora=True)
    examples = _examples()
    _assert_same(_packed_loss_and_grads(model, _packed_batch(examples)),
                 _one_by_one_loss_and_grads(model, examples), "normal path")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma"])
def test_varlen_branch_equals_dense_and_one_by_one(force_varlen, arch, monkeypatch):
    model = _model(arch, lora=True)
    examples = _examples()
    batch = _packed_batch(examples)
    before = packed.computations
    through_varlen = _packed_loss_and_grads(model, batch)
    assert len(force_varlen) == 2 and packed.computations == before + 1  # 2 layers, 1 computation
    _assert_same(through_varlen, _one_by_one_loss_and_grads(model, examples), f"{arch} varlen vs one by one")
    monkeypatch.setattr(packed, "tensors_supported", lambda q: False)
    _assert_same(through_varlen, _packed_loss_and_grads(model, batch), f"{arch} varlen vs dense")


def test_varlen_branch_under_gradient_checkpointing(force_varlen):
    model = _model(lora=True)
    batch = _packed_batch(_examples())
    plain = _packed_loss_and_grads(model, batch)
    calls = len(force_varlen)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    before = packed.computations
    checkpointed = _packed_loss_and_grads(model, batch)
    assert packed.computations == before + 1  # the recompute reuses the forward's cu_seqlens
    assert len(force_varlen) - calls == 4  # 2 layers, forward + recompute
    _assert_same(checkpointed, plain, "checkpointed")


def test_mistral_window_cutting_an_example_stays_exact(force_varlen):
    model = _model("mistral", lora=True)
    model.get_base_model().config.sliding_window = 4
    examples = _examples()
    batch = _packed_batch(examples)
    result = _packed_loss_and_grads(model, batch)
    assert not force_varlen  # examples longer than the window: normal path
    _assert_same(result, _one_by_one_loss_and_grads(model, examples), "window 4")


def test_eval_under_inference_mode_takes_varlen_and_matches(force_varlen, monkeypatch):
    model = _model(lora=True)
    model.eval()
    batch = _packed_batch(_examples())
    with torch.inference_mode():
        varlen = model(**batch).loss
        assert len(force_varlen) == 2
        monkeypatch.setattr(packed, "tensors_supported", lambda q: False)
        dense = model(**batch).loss
    assert rel_err(varlen, dense) <= 1e-5


def test_eval_and_generation_untouched(force_varlen):
    model = _model()
    model.eval()
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 9) and not force_varlen


@pytest.mark.gpu
def test_varlen_matches_dense_mask_bf16_cuda(monkeypatch):
    model = _model(lora=True, dtype=torch.bfloat16, device="cuda", hidden_size=256, num_attention_heads=4,
                   num_key_value_heads=2)
    examples = _examples()
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _packed_batch(examples).items()}
    real, calls = packing.packed_varlen_attention, []
    monkeypatch.setattr(packing, "packed_varlen_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    before = packed.computations
    loss_v, g_v = _packed_loss_and_grads(model, batch)
    assert len(calls) == 2 and packed.computations == before + 1, "varlen path not taken once per layer"
    monkeypatch.setattr(packed, "tensors_supported", lambda q: False)
    loss_d, g_d = _packed_loss_and_grads(model, batch)
    assert rel_err(loss_v.float(), loss_d.float()) <= 2e-2
    assert g_v and all("lora_" in n for n in g_v)
    for name in g_v:
        assert not torch.isnan(g_v[name]).any(), name
        assert rel_err(g_v[name].float(), g_d[name].float()) <= 2e-2, name
