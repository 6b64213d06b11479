"""Offloaded activation checkpoints (patch/offload.py): same numbers, and the layer inputs really are what is held.

On the CPU the "host" is where the tensors already are, so the proof is by accounting: exactly one tensor per
checkpointed layer goes through the offload hooks, ``tokens x hidden x dtype`` bytes each, held from forward until
backward releases it -- nothing saved inside a layer, nothing left after. The GPU test (``gpu`` marker) checks the
same on CUDA, where the copies are pinned and GPU memory between forward and backward drops by those bytes.
"""

from __future__ import annotations

import gc
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

from test_train_accum import grads, max_diff, recipe_for  # noqa: E402
from test_train_cli import run_cli, write_recipe  # noqa: E402

TOL = 1e-6


def _model_and_batch(tmp_path, model_dir, offload: bool, kernels: str = "none", method: str = "lora", park_layers=()):
    from onecard.data import build_dataset, collate, pad_token_id
    from onecard.train.sft import apply_recipe_kernels
    from onecard.train.spine import seed_everything
    from onecard.train.model import enable_grad_ckpt, load_model_and_tokenizer

    recipe = recipe_for(tmp_path, model_dir, grad_ckpt=True, offload_activations=offload, kernels=kernels)
    recipe = recipe.model_copy(update={"method": method})
    seed_everything(recipe.training.seed)
    model, tok = load_model_and_tokenizer(recipe, "cpu", park_layers)
    for name, param in model.named_parameters():  # lora_B = 0 would make lora_A's gradient 0: exercise both
        if "lora_B" in name:
            param.data.normal_(0, 0.05)  # after seed_everything: the same in every model built here
    if kernels != "none":
        apply_recipe_kernels(model, recipe, "cpu")
    enable_grad_ckpt(model, recipe)
    model.train()
    examples = build_dataset(recipe, tok).examples[:2]  # on the CPU Triton's interpreter runs a program per token
    batch = collate(examples, pad_token_id(tok))
    return model, batch


def _loss_and_grads(model, batch):
    import torch

    torch.manual_seed(0)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    return out.loss.item(), grads(model)


@pytest.mark.parametrize("method,kernels", [("lora", "none"), ("lora", "onecard"), ("qlora", "none")])
def test_offload_gives_the_same_loss_and_gradients(tmp_path, tiny_llama_dir, method, kernels):
    off_model, batch = _model_and_batch(tmp_path, tiny_llama_dir, offload=False, kernels=kernels, method=method)
    on_model, _ = _model_and_batch(tmp_path, tiny_llama_dir, offload=True, kernels=kernels, method=method)
    assert max_diff(dict(off_model.named_parameters()), dict(on_model.named_parameters())) == 0  # same weights
    loss_off, g_off = _loss_and_grads(off_model, batch)
    loss_on, g_on = _loss_and_grads(on_model, batch)
    assert g_off and all(g.abs().sum() > 0 for g in g_off.values())  # every trainable gradient is exercised
    assert abs(loss_on - loss_off) <= TOL * max(1.0, abs(loss_off))
    assert g_on.keys() == g_off.keys()
    assert max_diff(g_on, g_off) <= TOL


def test_exactly_the_layer_inputs_are_held_until_backward(tmp_path, tiny_llama_dir):
    from onecard.patch import offload

    model, batch = _model_and_batch(tmp_path, tiny_llama_dir, offload=True)
    cfg = model.config
    tokens = batch["input_ids"].numel()
    expected_bytes = cfg.num_hidden_layers * tokens * cfg.hidden_size * 4  # fp32 on the CPU
    offload.reset_stats()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    held = offload.stats()
    assert held["tensors"] == cfg.num_hidden_layers
    assert held["bytes"] == expected_bytes
    assert held["live_bytes"] == expected_bytes  # the forward -> backward gap: all of them waiting
    assert held["held_on"] == ["cpu"]
    out.loss.backward()
    del out
    gc.collect()
    after = offload.stats()
    assert after["tensors"] == cfg.num_hidden_layers  # backward's recompute offloads nothing more
    assert after["live_bytes"] == 0  # released once their layer's backward has run


def test_without_offload_nothing_goes_through_the_hooks(tmp_path, tiny_llama_dir):
    from onecard.patch import offload

    model, batch = _model_and_batch(tmp_path, tiny_llama_dir, offload=False)
    offload.reset_stats()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    assert offload.stats()["tensors"] == 0


def test_offload_on_a_model_without_checkpointed_layers_is_refused():
    import torch

    from onecard.patch.offload import enable_offloaded_checkpointing

    with pytest.raises(RuntimeError, match="no checkpointed"):
        enable_offloaded_checkpointing(torch.nn.Linear(2, 2))


def test_onecard_train_with_offload_runs_end_to_end(tmp_path, tiny_llama_dir, capsys):
    import json

    from onecard.patch import offload

    recipe = write_recipe(tmp_path, tiny_llama_dir)
    offload.reset_stats()
    code, out, err = run_cli(["train", str(recipe), "--set", "training.grad_ckpt=true",
                              "--set", "training.offload_activations=true"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "cli" / "summary.json").read_text())
    assert summary.get("steps", summary.get("global_step", 2)) >= 1
    assert offload.stats()["tensors"] == 2 * 2  # 2 layers x 2 optimizer steps of one micro-batch each


def test_offload_without_checkpointing_is_refused(tmp_path, tiny_llama_dir, capsys):
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    code, _, err = run_cli(["train", str(recipe), "--set", "training.offload_activations=true"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "grad_ckpt" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.gpu
def test_gpu_checkpoints_wait_in_pinned_host_memory(tmp_path, tiny_model_factory):
    """On CUDA: pinned host copies, and GPU memory held between forward and backward drops by their bytes."""
    import torch

    from onecard.tiny import tiny_config
    from onecard.patch import offload
    from onecard.patch.offload import enable_offloaded_checkpointing

    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", vocab_size=320, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4)
    held_gpu, grads_by = {}, {}
    x = torch.randint(0, 320, (4, 512), device="cuda")
    for on in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        if on:
            enable_offloaded_checkpointing(model)
        offload.reset_stats()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = model(input_ids=x, labels=x)
        torch.cuda.synchronize()
        held_gpu[on] = torch.cuda.memory_allocated() - before
        assert not any(offload._COPYING.values())  # the decoder stack's end released every copied source
        stats = offload.stats()
        out.loss.backward()
        torch.cuda.synchronize()
        prefetched = offload.stats()["prefetched"]
        assert prefetched == (config.num_hidden_layers - 1 if on else 0)  # every layer's input but the last's
        grads_by[on] = [p.grad.float() for p in model.parameters()]
        del out, model
    expected = config.num_hidden_layers * x.numel() * config.hidden_size * 2
    assert stats["bytes"] == expected and stats["pinned"] == config.num_hidden_layers
    assert stats["held_on"] == ["cpu"]
    assert held_gpu[False] - held_gpu[True] >= 0.9 * expected
    assert max((a - b).abs().max().item() for a, b in zip(grads_by[False], grads_by[True])) == 0.0


def test_the_decoder_stack_releases_offloaded_sources_once(tmp_path, tiny_llama_dir):
    """enable_offloaded_checkpointing hooks the module holding the layers (before the LM head and the loss) to let go
    of the offloaded sources; a second call adds no second hook."""
    from onecard.patch.offload import enable_offloaded_checkpointing, release_copied

    model, _ = _model_and_batch(tmp_path, tiny_llama_dir, offload=True)
    enable_offloaded_checkpointing(model)
    hooked = [m for m in model.modules() if release_copied in m._forward_hooks.values()]
    assert hooked == [model.get_base_model().model]
