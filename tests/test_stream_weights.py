"""Streamed base weights (patch/stream_weights.py): same loss and gradients, and the slots really are what runs.

On the CPU the "device" slots are separate CPU buffers and the parked weights separate host buffers, so a layer that
ran on a stale or overwritten slot would give other numbers. With 2 slots over 3 streamed layers every slot is reused
within one step, forward and backward. The GPU test does the same on CUDA with pinned host memory, and checks that
the slots are allocated once (no allocation per step).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

from test_offload import _model_and_batch  # noqa: E402
from test_train_accum import grads, max_diff  # noqa: E402


@pytest.fixture
def torch_references():
    """Model-level tests run onecard's Triton ops as their torch references (kernels/_triton.py reference_only):
    streaming binds weights, it does not touch the ops, and the CPU interpreter would take a minute per case.
    The kernels themselves are checked against those references in the kernel tests."""
    from onecard.kernels._triton import reference_only

    with reference_only():
        yield


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory):
    """A 4-layer tiny Llama: with 1 resident layer and 2 slots, every slot is reused within a step."""
    from onecard.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-llama-4"), "llama", num_hidden_layers=4))


def _step(model, batches):
    import torch

    torch.manual_seed(0)
    losses = []
    for batch in batches:  # gradient accumulation: several forward/backward before reading the grads
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        losses.append(out.loss.item())
    return losses, grads(model)


def _aligned(model):
    """Frozen weights in fresh 64-byte-aligned storage, as the streamed copies are. The loader's tensors sit at the
    safetensors file's offsets (e.g. 40 mod 64), and CPU matmuls on such storage round differently at 1 ulp: with
    DoRA's W A^T that is 6e-8 in a gradient between the loaded and the cloned model, without any streaming."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.clone()
    return model


def _halves(batch):
    return [{k: v[i:i + 1] for k, v in batch.items()} for i in range(min(2, batch["input_ids"].shape[0]))]


@pytest.mark.parametrize("method,kernels,offload", [("lora", "none", False), ("lora", "onecard", False),
                                                    ("lora", "onecard", True), ("qlora", "none", False),
                                                    ("qlora", "onecard", True), ("dora", "onecard", False)])
def test_streaming_gives_the_same_loss_and_gradients(tmp_path, four_layer_dir, method, kernels, offload,
                                                     torch_references):
    from onecard.patch.stream_weights import apply_weight_streaming, decoder_layers

    ref_model, batch = _model_and_batch(tmp_path, four_layer_dir, offload=offload, kernels=kernels, method=method)
    model, _ = _model_and_batch(tmp_path, four_layer_dir, offload=offload, kernels=kernels, method=method)
    _aligned(ref_model), _aligned(model)
    batches = _halves(batch)
    loss_ref, g_ref = _step(ref_model, batches)
    n_layers = len(decoder_layers(model))
    ws = apply_weight_streaming(model, "cpu", resident=1, slots=2)
    assert len(ws.slots) == 2 and len(ws.streamed) == n_layers - 1 >= 3
    slot_ptrs = {s.flat.data_ptr() for s in ws.slots}
    seen = []

    def spy(module, args):  # registered after the streaming hooks: runs with the layer bound
        w = module.q_proj.base_layer.weight if hasattr(module.q_proj, "base_layer") else module.q_proj.weight
        seen.append(w.data_ptr())

    handles = [decoder_layers(model)[i].self_attn.register_forward_pre_hook(spy) for i in ws.streamed]
    loss_on, g_on = _step(model, batches)
    for h in handles:
        h.remove()
    assert loss_on == loss_ref
    assert g_on.keys() == g_ref.keys() and max_diff(g_ref, g_on) == 0
    # every streamed layer's forward and recompute read a slot, never the parked host copy
    assert len(seen) >= 2 * len(batches) * len(ws.streamed)
    assert all(any(p <= ptr < p + ws.layer_bytes for p in slot_ptrs) for ptr in seen)
    # slots were reused (2 slots, >= 3 layers), and the turnarounds found their layers still there
    assert ws.stats.copies > len(ws.slots) and ws.stats.hits > 0
    assert not any(s.held for s in ws.slots)  # everything released after backward
    ws.revert()
    loss_back, g_back = _step(model, batches)  # grads accumulate onto the first step's: same again
    assert loss_back == loss_on
    assert max_diff({k: 2 * v for k, v in g_on.items()}, g_back) < 1e-6


def test_parked_weights_are_the_true_values_and_eval_streams(tmp_path, four_layer_dir):
    import torch

    from onecard.patch.stream_weights import apply_weight_streaming

    ref_model, batch = _model_and_batch(tmp_path, four_layer_dir, offload=False)
    model, _ = _model_and_batch(tmp_path, four_layer_dir, offload=False)
    before = {k: v.clone() for k, v in ref_model.state_dict().items()}
    ws = apply_weight_streaming(model, "cpu", resident=0, slots=2)
    after = model.state_dict()  # what saving / exporting reads while streaming is on
    assert max_diff(before, after) == 0
    ref_model.eval()
    model.eval()
    with torch.no_grad():
        ref = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for _ in range(2):  # an eval forward wraps around: the second pass prefetches from the start
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            assert torch.equal(out, ref)
    assert ws.stats.prefetched > 0


def test_training_without_checkpointing_is_refused(tmp_path, four_layer_dir):
    from onecard.patch.stream_weights import apply_weight_streaming, decoder_layers

    model, batch = _model_and_batch(tmp_path, four_layer_dir, offload=False)
    model.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))
    apply_weight_streaming(model, "cpu", slots=2)
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_streaming_on_cuda_same_numbers_no_allocation_per_step(tmp_path, four_layer_dir, method):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from onecard.patch.stream_weights import apply_weight_streaming

    def build():
        model, batch = _model_and_batch(tmp_path, four_layer_dir, offload=True, kernels="none", method=method)
        model.to("cuda")
        return model, [{k: v.cuda() for k, v in b.items()} for b in _halves(batch)]

    ref_model, batches = build()
    loss_ref, g_ref = _step(ref_model, batches)
    ref_model.zero_grad(set_to_none=True)
    _, g_again = _step(ref_model, batches)  # CUDA's attention backward may not be bit-reproducible run to run
    noise = max_diff(g_ref, g_again)
    del ref_model
    model, _ = build()
    ws = apply_weight_streaming(model, "cuda", resident=1, slots=2)
    assert all(r.host.is_pinned() for i in ws.streamed for r in ws.refs[i])
    _step(model, batches)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    loss_on, g_on = _step(model, batches)
    torch.cuda.synchronize()
    assert torch.cuda.memory_reserved() == reserved  # the second step reserved nothing new
    assert loss_on == loss_ref and max_diff(g_ref, g_on) <= noise
    assert ws.stats.copies > len(ws.slots)


def test_recipe_switch_is_a_noop_on_cpu_that_says_so(tmp_path, four_layer_dir):
    from test_train_accum import recipe_for

    from onecard.train.stream_setup import decide

    on = decide(recipe_for(tmp_path, four_layer_dir, grad_ckpt=True, offload_weights=True), "cpu")
    assert not on.stream and "no-op on the CPU" in on.message
    auto = decide(recipe_for(tmp_path, four_layer_dir, grad_ckpt=True), "cpu")
    assert not auto.stream and auto.message == ""
    off = decide(recipe_for(tmp_path, four_layer_dir, grad_ckpt=True, offload_weights=False), "cpu")
    assert not off.stream


def test_host_ram_short_is_refused_before_loading():
    import types

    from onecard.errors import UserError
    from onecard.plan.streaming import host_ram_check
    from onecard.train.stream_setup import _check_host_ram

    _check_host_ram(types.SimpleNamespace(host_total_bytes=1 << 20), host_ram_check)  # 1 MiB: fine
    with pytest.raises(UserError, match="pinned host memory"):
        _check_host_ram(types.SimpleNamespace(host_total_bytes=1 << 50), host_ram_check)  # 1 PiB


def test_streamed_layers_are_spread_between_the_resident_ones():
    from onecard.patch.stream_weights import streamed_layer_ids

    assert streamed_layer_ids(6, 0) == list(range(6)) and streamed_layer_ids(6, 6) == []
    for n_layers, resident in [(48, 28), (80, 27), (32, 8), (4, 1), (5, 3)]:
        ids = streamed_layer_ids(n_layers, resident)
        assert len(ids) == len(set(ids)) == n_layers - resident and ids == sorted(ids)
        assert ids[-1] == n_layers - 1  # the forward's last layer streams: it is still in its slot for backward
        gaps = [b - a for a, b in zip(ids, ids[1:])]
        assert max(gaps) - min(gaps) <= 1  # evenly spread: no run of streamed layers with the copies piling up


@pytest.mark.parametrize("method", ["lora", "qlora", "dora"])
def test_a_base_read_layer_by_layer_and_parked_trains_as_one_loaded_whole(tmp_path, four_layer_dir, method,
                                                                           torch_references):
    """train/layerwise.py: the loader for a base larger than the card. The parked layers are what streaming runs on
    (no second host copy), and loss and gradients equal the whole-loaded model's."""
    from onecard.patch.stream_weights import PARKED, apply_weight_streaming, decoder_layers, streamed_layer_ids

    park = streamed_layer_ids(4, 1)
    ref_model, batch = _model_and_batch(tmp_path, four_layer_dir, offload=False, kernels="onecard", method=method)
    model, _ = _model_and_batch(tmp_path, four_layer_dir, offload=False, kernels="onecard", method=method,
                                park_layers=park)
    layers = decoder_layers(model)
    parked = {i: layers[i].__dict__[PARKED].data_ptr() for i in park}
    assert set(parked) == set(park) and not any(PARKED in layers[i].__dict__ for i in range(4) if i not in park)
    _aligned(ref_model)
    ws = apply_weight_streaming(model, "cpu", resident=1, slots=2)
    assert ws.streamed == park and all(ws._host_flat[i].data_ptr() == parked[i] for i in park)
    batches = _halves(batch)
    loss_ref, g_ref = _step(ref_model, batches)
    loss, g = _step(model, batches)
    assert loss == loss_ref
    assert max_diff(g_ref, g) < 1e-6 and ws.stats.copies > len(ws.slots)


def test_layerwise_loading_names_the_missing_tensor(tmp_path, four_layer_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    from onecard.errors import UserError
    from onecard.train.layerwise import CheckpointReader, build_layerwise

    bad = tmp_path / "renamed"
    shutil.copytree(four_layer_dir, bad)
    (file,) = bad.glob("*.safetensors")
    tensors = load_file(str(file))
    key = next(k for k in tensors if "layers.2.mlp.down_proj" in k)
    tensors[key.replace("down_proj", "w2")] = tensors.pop(key)
    save_file(tensors, str(file), metadata={"format": "pt"})
    from transformers import AutoConfig

    import torch

    reader = CheckpointReader(bad)
    with pytest.raises(UserError, match=r"no tensor model\.layers\.2\.mlp\.down_proj\.weight"):
        build_layerwise(AutoConfig.from_pretrained(bad), "cpu", lambda m, prefix: reader.fill(m, prefix, torch.float32),
                        dtype=torch.float32)


@pytest.mark.parametrize("quant_type,double_quant", [("fp4", False), ("nf4", True)])
def test_layerwise_qlora_uses_the_recipe_s_4bit_settings(four_layer_dir, quant_type, double_quant):
    """The layer-by-layer loader quantises as the recipe says (quant.quant_type, quant.double_quant), as the
    whole-model loader's BitsAndBytesConfig does, not always NF4 with double quantisation."""
    import bitsandbytes as bnb
    import torch

    from onecard.recipe import validate_recipe
    from onecard.train.layerwise import load_layerwise

    recipe = validate_recipe({"model": {"name_or_path": four_layer_dir}, "method": "qlora",
                              "quant": {"quant_type": quant_type, "double_quant": double_quant,
                                        "compute_dtype": "float32"}})
    model, _ = load_layerwise(recipe, four_layer_dir, "cpu", torch.float32, ())
    q = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert q and all(m.weight.quant_type == quant_type for m in q)
    assert all(m.weight.compress_statistics == double_quant for m in q)
    assert all((m.weight.quant_state.state2 is not None) == double_quant for m in q)
