"""Offloaded checkpoints of onecard-patched layers, split into attention and MLP halves (patch/blocks.py).

Same loss and gradients as the unpatched, uncheckpointed model; two offloaded inputs per layer; the attention
half's recompute skips the o projection (its output is left unread) and the MLP half's the down projection;
whichever order kernels and checkpointing are set up in; not for DoRA's o projection (it saves its output), not for
a layer with module hooks, not after revert.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _kernel_env  # noqa: E402,F401
from _kernel_env import rel_err  # noqa: E402
from test_patch_families import _batch, _loss_and_grads, _model  # noqa: E402

from onecard.kernels._triton import reference_only  # noqa: E402
from onecard.patch import apply_kernels, modules  # noqa: E402
from onecard.patch.recompute import recompute_contexts  # noqa: E402
from onecard.patch import offload  # noqa: E402


@pytest.fixture(autouse=True)
def _reference_kernels():
    with reference_only():  # wiring, not kernel numerics: the torch references on CPU
        yield


def _checkpoint_offloaded(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                       "context_fn": recompute_contexts})
    model.enable_input_require_grads()
    offload.enable_offloaded_checkpointing(model)


def _count_calls(monkeypatch):
    calls = {"o_skipped": 0, "projections": 0, "mlp_skipped": 0}
    real_mlp, real_proj = modules.lora_mlp, modules.lora_projections

    def counting_mlp(*args, **kw):
        calls["mlp_skipped"] += bool(kw.get("skip_output"))
        return real_mlp(*args, **kw)

    def counting_projections(*args, **kw):
        calls["projections"] += 1
        calls["o_skipped"] += bool(kw.get("skip_output"))
        return real_proj(*args, **kw)

    monkeypatch.setattr(modules, "lora_mlp", counting_mlp)
    monkeypatch.setattr(modules, "lora_projections", counting_projections)
    return calls


def _assert_same(got, g_got, want, g_want):
    assert abs(float(got.loss) - float(want.loss)) <= 1e-5 * float(want.loss)
    assert g_got.keys() == g_want.keys()
    for name in g_want:
        assert rel_err(g_got[name], g_want[name]) <= 1e-4, name


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma"])
def test_split_halves_match_and_skip_both_last_projections(arch, monkeypatch):
    calls = _count_calls(monkeypatch)
    model = _model(arch, lora=True)
    ids, labels = _batch()
    plain, g_plain = _loss_and_grads(model, ids, labels)
    _checkpoint_offloaded(model)
    handle = apply_kernels(model, "onecard")
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    assert handle.patched["split_layers"] == layers
    offload.reset_stats()
    split, g_split = _loss_and_grads(model, ids, labels)
    _assert_same(split, g_split, plain, g_plain)
    held = offload.stats()
    assert held["tensors"] == 2 * layers  # x and x + attn(x) of every layer
    assert held["bytes"] == 2 * layers * ids.numel() * hidden * 4
    assert calls["projections"] == 2 * 2 * layers  # q/k/v and o, forward and recompute
    assert calls["o_skipped"] == layers  # once per layer: the attention half's recompute
    assert calls["mlp_skipped"] == layers
    handle.revert()
    offload.reset_stats()
    _loss_and_grads(model, ids, labels)
    assert offload.stats()["tensors"] == layers  # whole layers again


def test_kernels_first_then_offloaded_checkpointing_still_splits(monkeypatch):
    """train/sft.py applies the kernels before it enables checkpointing; the bench does the reverse."""
    calls = _count_calls(monkeypatch)
    model = _model("llama", lora=True)
    ids, labels = _batch()
    plain, g_plain = _loss_and_grads(model, ids, labels)
    apply_kernels(model, "onecard")
    _checkpoint_offloaded(model)
    offload.reset_stats()
    split, g_split = _loss_and_grads(model, ids, labels)
    _assert_same(split, g_split, plain, g_plain)
    assert offload.stats()["tensors"] == 2 * model.config.num_hidden_layers
    assert calls["o_skipped"] == model.config.num_hidden_layers


def test_plain_checkpointing_keeps_whole_layers(monkeypatch):
    """On the GPU the extra saved tensor per layer costs 4 GiB at 8B b8: without offloading, no split."""
    calls = _count_calls(monkeypatch)
    model = _model("llama", lora=True)
    ids, labels = _batch()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                       "context_fn": recompute_contexts})
    apply_kernels(model, "onecard")
    _loss_and_grads(model, ids, labels)
    assert calls["o_skipped"] == 0 and calls["mlp_skipped"] == model.config.num_hidden_layers


def _hooks_inside_checkpoint() -> bool:
    """transformers 5.17 checkpoints ``nn.Module.__call__`` (module hooks inside); 5.24 checkpoints ``forward``."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    class Probe(GradientCheckpointingLayer):
        def forward(self, x):
            return x

    probe, seen = Probe(), []
    probe.gradient_checkpointing = True
    probe._gradient_checkpointing_func = lambda fn, *args: seen.append(fn) or fn(*args)
    probe.register_forward_pre_hook(lambda mod, args: seen.append("hook"))
    probe.train()
    probe(torch.ones(1, requires_grad=True))
    return seen[0] != "hook"  # hooks inside: the checkpoint function was called before the hook ran


def test_installed_transformers_checkpoint_form_is_recognised():
    """A transformers release that hands its checkpoint function in a new form must fail here, not fall back to
    whole layers in silence (the planner plans halves)."""
    from onecard.patch.blocks import checkpoint_form_recognised

    assert checkpoint_form_recognised()


def test_unrecognised_checkpoint_form_says_so_and_marks_nothing(monkeypatch):
    from onecard.patch import blocks

    monkeypatch.setattr(blocks, "checkpoint_form_recognised", lambda: False)
    model = _model("llama", lora=True)
    handle = apply_kernels(model, "onecard")
    assert "split_layers" not in handle.patched
    assert "offloaded checkpoints stay whole layers" in handle.notice
    handle.revert()


def test_a_layer_with_hooks_is_split_only_when_its_hooks_stay_outside_the_checkpoint():
    """With hooks inside the checkpointed call (transformers 5.17) the halves would skip them: that layer stays
    whole. With ``forward`` checkpointed (5.24) the hooks run around the whole checkpoint, split or not."""
    model = _model("llama", lora=True)
    ids, labels = _batch()
    plain, g_plain = _loss_and_grads(model, ids, labels)
    _checkpoint_offloaded(model)
    apply_kernels(model, "onecard")
    hook_calls = []
    model.get_base_model().model.layers[0].register_forward_pre_hook(lambda mod, args: hook_calls.append(1))
    offload.reset_stats()
    split, g_split = _loss_and_grads(model, ids, labels)
    _assert_same(split, g_split, plain, g_plain)
    whole = 1 if _hooks_inside_checkpoint() else 0
    assert offload.stats()["tensors"] == 2 * model.config.num_hidden_layers - whole
    assert hook_calls  # the hook still ran


def test_split_checkpoints_are_counted():
    from onecard.patch import blocks

    model = _model("llama", lora=True)
    ids, labels = _batch()
    _checkpoint_offloaded(model)
    apply_kernels(model, "onecard")
    before = blocks.CALLS["split"]
    _loss_and_grads(model, ids, labels)
    assert blocks.CALLS["split"] - before == model.config.num_hidden_layers


def test_dora_o_projection_is_not_skipped(monkeypatch):
    """A DoRA projection saves its output (for the magnitude's gradient): the recompute must produce it."""
    from peft import LoraConfig, get_peft_model

    from onecard.kernels import lora_linear

    skipped = []
    real = lora_linear.skipped_forward
    monkeypatch.setattr(lora_linear, "skipped_forward", lambda *a: skipped.append(1) or real(*a))
    torch.manual_seed(0)
    base = _model("llama")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    ids, labels = _batch()
    plain, g_plain = _loss_and_grads(model, ids, labels)
    _checkpoint_offloaded(model)
    apply_kernels(model, "onecard")
    split, g_split = _loss_and_grads(model, ids, labels)
    _assert_same(split, g_split, plain, g_plain)
    assert skipped == []


def test_skipped_outputs_leave_backward_unchanged():
    """lora_projections(skip_output=True) saves what a full forward saves: the same gradients from the same dy."""
    from onecard.kernels.lora_linear import lora_projections

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 16, generator=g, dtype=torch.float64)
    w, a, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((12, 16), (4, 16), (12, 4)))
    dy = torch.randn(5, 7, 12, generator=g, dtype=torch.float64)
    results = []
    for skip in (False, True):
        xs, as_, bs = (t.clone().requires_grad_() for t in (x, a, b))
        (y,) = lora_projections(xs, [(w, as_, bs, 2.0)], skip_output=skip)
        assert y.shape == (5, 7, 12)
        y.backward(dy)
        results.append((xs.grad, as_.grad, bs.grad))
    for full, skipped in zip(*results):
        assert torch.equal(full, skipped)


@pytest.mark.gpu
def test_gpu_split_halves_match_whole_layers():
    """On CUDA (compiled kernels, bf16, LoRA): split offloaded halves vs whole-layer plain checkpoints -- the same
    ops in the same order, only where the recompute ends differs -- agree to bf16 rounding (the attention backward
    may accumulate in another order), with 2 pinned copies per layer, each prefetched but the last."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from onecard.tiny import tiny_config

    config = tiny_config("llama", vocab_size=320, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4)
    x = torch.randint(0, 320, (4, 512), device="cuda")
    grads = {}
    for split in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                           "context_fn": recompute_contexts})
        model.enable_input_require_grads()
        if split:
            offload.enable_offloaded_checkpointing(model)
        handle = apply_kernels(model, "onecard")
        offload.reset_stats()
        model(input_ids=x, labels=x).loss.backward()
        torch.cuda.synchronize()
        stats = offload.stats()
        grads[split] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        handle.revert()
        del model
    layers = config.num_hidden_layers
    assert stats["pinned"] == 2 * layers and stats["prefetched"] == 2 * layers - 1
    for name in grads[False]:
        assert rel_err(grads[True][name].float(), grads[False][name].float()) <= 1e-2, name
