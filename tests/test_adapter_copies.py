"""Adapters cast once per training forward (patch/adapter_copies.py): the same bits as casting at every use, in
far fewer ops, and never a copy made under other weights or another adapter state."""

from __future__ import annotations

import copy
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _kernel_env  # noqa: E402,F401

from onecard.kernels._triton import reference_only  # noqa: E402
from onecard.patch import adapter_copies, apply_kernels  # noqa: E402
from onecard.patch.recompute import recompute_contexts  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _reference_kernels(request):
    if request.node.get_closest_marker("gpu"):  # the compiled kernels, on CUDA
        yield
        return
    with reference_only():  # wiring, not kernel numerics: the torch references on CPU
        yield


def _bf16_lora_model(checkpointing: bool = True, dropout: float = 0.0, dora: bool = False, alpha: float = 8):
    """A tiny bf16 Llama with fp32 LoRA adapters (peft's default on a bf16 base), onecard's kernels on."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from onecard.tiny import tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=300, intermediate_size=96),
                                                          dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS,
                                             use_dora=dora))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft inits B = 0: make the adapters do something
            torch.nn.init.normal_(p, std=0.05)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                           "context_fn": recompute_contexts})
        model.enable_input_require_grads()
    model.train()
    handle = apply_kernels(model, "onecard")
    return model, handle


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (2, 17), generator=g) for _ in range(4)]


def _train(model, batches, between=None):
    """Two optimizer steps of two micro-batches each; ``between(model, ids)`` runs after each forward, before its
    backward. Returns the losses, the last step's gradients and the final adapter weights."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], {}
    for step in range(2):
        for ids in batches[2 * step: 2 * step + 2]:
            loss = model(input_ids=ids, labels=ids).loss
            if between is not None:
                between(model, ids)
            loss.backward()
            losses.append(float(loss))
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad(set_to_none=True)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, grads, weights


def _without_copies(monkeypatch):
    monkeypatch.setattr(adapter_copies, "make_copies", lambda parents, dtype: 0)


def _assert_identical(got, want):
    assert got[0] == want[0]
    for got_d, want_d in ((got[1], want[1]), (got[2], want[2])):
        assert got_d.keys() == want_d.keys()
        for name in want_d:
            assert torch.equal(got_d[name], want_d[name]), name


@pytest.mark.parametrize("dora,alpha", [(False, 8), (True, 8), (False, 6), (False, 4)])
def test_same_bits_as_casting_per_use(monkeypatch, dora, alpha):
    """Checkpointed, gradient accumulation, two optimizer steps: losses, gradients and weights bit-identical.
    r = 4: alpha 8 is a scale of 2, folded into A's copy; 6 (1.5) is left to the fused ops; 4 is 1. DoRA: its fp32
    magnitude is not copied."""
    model = _bf16_lora_model(dora=dora, alpha=alpha)[0]
    with_copies = _train(model, _batches())
    copies = [m.__dict__.get(adapter_copies.COPIES_ATTR) for m in model.modules() if hasattr(m, "lora_A")]
    assert all(c is not None and c.folded == (alpha == 8) for c in copies)
    _without_copies(monkeypatch)
    per_use = _train(_bf16_lora_model(dora=dora, alpha=alpha)[0], _batches())
    _assert_identical(with_copies, per_use)
    assert any(g.abs().sum() > 0 for n, g in with_copies[1].items() if "lora_A" in n)


class _CountOps(TorchDispatchMode):
    CASTS = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
    SCALINGS = (torch.ops.aten.mul_.Scalar, torch.ops.aten.mul_.Tensor)

    def __init__(self):
        super().__init__()
        self.casts = self.scalings = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.casts += func in self.CASTS
        if func in self.SCALINGS:  # those of the fused LoRA ops (the loss has its own)
            self.scalings += any("kernels/lora_" in f.filename for f in traceback.extract_stack())
        return func(*args, **(kwargs or {}))


def _ops_in_a_step(model) -> _CountOps:
    ids = _batches()[0]
    with _CountOps() as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter


def _casts_in_a_step(model) -> int:
    return _ops_in_a_step(model).casts


def test_a_step_casts_each_adapter_once_not_per_use(monkeypatch):
    model, _ = _bf16_lora_model()
    adapted = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    with_copies = _casts_in_a_step(model)
    _without_copies(monkeypatch)
    per_use = _casts_in_a_step(_bf16_lora_model()[0])
    # per use: A and B cast in forward and in the recompute, and each gradient cast back
    assert per_use - with_copies >= 5 * adapted, (per_use, with_copies, adapted)


def test_a_reference_pass_between_forward_and_backward_changes_nothing(monkeypatch):
    """DPO/KTO run the reference (adapter disabled, no grad) beside the policy: the recompute must still use
    the policy's copies, and the reference pass must not make or read any."""

    def reference_pass(model, ids):
        with torch.no_grad(), model.disable_adapter():
            model(input_ids=ids)

    got = _train(_bf16_lora_model()[0], _batches(), between=reference_pass)
    _without_copies(monkeypatch)
    want = _train(_bf16_lora_model()[0], _batches())
    _assert_identical(got, want)


def test_no_copies_without_grad_or_after_revert():
    model, handle = _bf16_lora_model(checkpointing=False)
    ids = _batches()[0]
    projections = [m for m in model.modules() if hasattr(m, "lora_A")]
    with torch.no_grad():
        model(input_ids=ids)
    assert not any(adapter_copies.COPIES_ATTR in m.__dict__ for m in projections)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(adapter_copies.COPIES_ATTR in m.__dict__ for m in projections)
    assert copy.deepcopy(model) is not None  # a reference copy of a trained policy: copies are not deep-copied
    handle.revert()
    assert not any(adapter_copies.COPIES_ATTR in m.__dict__ for m in projections)
    model(input_ids=ids, labels=ids).loss.backward()
    assert not any(adapter_copies.COPIES_ATTR in m.__dict__ for m in projections)


def test_a_replaced_parameter_is_cast_not_read_from_a_stale_copy():
    model, _ = _bf16_lora_model(checkpointing=False)
    ids = _batches()[0]
    model(input_ids=ids, labels=ids).loss.backward()
    proj = next(m for m in model.modules() if hasattr(m, "lora_A"))
    name = proj.active_adapters[0]
    a, b = proj.lora_A[name].weight, proj.lora_B[name].weight
    scale = float(proj.scaling[name])
    assert adapter_copies.compute_weights(proj, name, a, b, scale, torch.bfloat16)[0] is proj.__dict__[
        adapter_copies.COPIES_ATTR].a
    proj.lora_A[name].weight = torch.nn.Parameter(a.detach() * 2)
    fresh, _, fresh_scale = adapter_copies.compute_weights(proj, name, proj.lora_A[name].weight, b, scale,
                                                           torch.bfloat16)
    assert torch.equal(fresh, (a.detach() * 2).to(torch.bfloat16)) and fresh_scale == scale


def test_after_an_optimizer_step_no_forward_reads_the_old_copies():
    """The step changes the fp32 weights; an eval-mode forward with grad (no copies made) must see the new ones."""
    model, _ = _bf16_lora_model(checkpointing=False)
    ids = _batches()[0]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    proj = next(m for m in model.modules() if hasattr(m, "lora_A"))
    name = proj.active_adapters[0]
    a, b = proj.lora_A[name].weight, proj.lora_B[name].weight
    assert adapter_copies.compute_weights(proj, name, a, b, float(proj.scaling[name]), torch.bfloat16)[0] is not \
        proj.__dict__[adapter_copies.COPIES_ATTR].a  # the step bumped the version: stale
    model.eval()
    model(input_ids=ids)
    assert adapter_copies.COPIES_ATTR not in proj.__dict__


def test_no_copies_where_peft_runs_the_projection_itself():
    """With LoRA dropout the fused ops step aside (peft's forward reads the fp32 weights): no copy to make."""
    model, _ = _bf16_lora_model(checkpointing=False, dropout=0.1)
    ids = _batches()[0]
    model(input_ids=ids, labels=ids).loss.backward()
    assert not any(adapter_copies.COPIES_ATTR in m.__dict__ for m in model.modules() if hasattr(m, "lora_A"))


def test_a_folded_scale_leaves_no_per_product_scaling(monkeypatch):
    """alpha = 2 x rank: the scale is in A's copy, so the fused ops scale no rank-r product (forward, recompute or
    backward); cast per use they scale each one."""
    folded = _ops_in_a_step(_bf16_lora_model()[0]).scalings
    _without_copies(monkeypatch)
    per_use = _ops_in_a_step(_bf16_lora_model()[0]).scalings
    layers = 2  # tiny_config
    assert folded == 0 and per_use >= 12 * layers, (folded, per_use)


def test_only_powers_of_two_fold():
    assert [adapter_copies.exact_to_fold(s) for s in (2.0, 4.0, 0.5, 1.0, 1.5, 3.0, 0.3)] == [
        True, True, True, False, False, False, False]


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_copies_match_casting_per_use(monkeypatch, fp8):
    """On CUDA with the compiled kernels, offloaded checkpoints and (FP8 on capability 8.9+) an FP8 base: two
    optimizer steps with the copies and the folded scale against casting per use. cuBLAS may pick split-K kernels
    whose sums are not bit-stable, so within 1e-3 relative (a missing or doubled scale, or a stale copy, is ~1)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores")
    from _kernel_env import rel_err, tiny_cuda_lora
    from onecard.patch import offload

    def build():
        model = tiny_cuda_lora(fp8)
        offload.enable_offloaded_checkpointing(model)
        model.train()
        apply_kernels(model, "onecard")
        return model

    batches = [torch.randint(0, 320, (2, 256), generator=torch.Generator().manual_seed(i)).cuda() for i in range(4)]
    got = _train(build(), batches)
    _without_copies(monkeypatch)
    want = _train(build(), batches)
    assert got[0] == pytest.approx(want[0], rel=1e-3)
    for name in want[1]:
        assert rel_err(got[1][name], want[1][name]) <= 1e-3, name
        assert rel_err(got[2][name], want[2][name]) <= 1e-3, name
