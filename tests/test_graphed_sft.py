"""training.cuda_graph (train/graphed_sft.py, lint/cuda_graph.py): right-padded rows without a mask train the same
tokens the masked ones do, the recorded step's window gives the eager step's loss and gradients, and every recipe
a recorded step cannot serve is refused by name. The recording itself is CUDA's (tests/test_graphed_step.py); here a
stand-in replays eagerly what the graph would."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

from onecard.errors import UserError  # noqa: E402
from onecard.lint import lint_recipe  # noqa: E402
from onecard.recipe import load_recipe  # noqa: E402
from onecard.train import graphed_sft, graphed_step  # noqa: E402
from onecard.train.sft import sft_step_class  # noqa: E402
from onecard.train.sft_step import SFTStep  # noqa: E402
from test_train_accum import grads, max_diff, recipe_for  # noqa: E402


class _EagerReplay:
    """What a recorded step does, eagerly: forward with labels and the token-count tensor, backward."""

    def __init__(self, model, inputs):
        self.model, self.shapes = model, {k: v.shape for k, v in inputs.items()}
        self.seen: list[dict] = []

    def step(self, batch):
        assert {k: v.shape for k, v in batch.items()} == self.shapes  # one shape for every micro-batch
        self.seen.append(batch)
        loss = self.model(**batch, use_cache=False).loss
        loss.backward()
        return loss.detach()


def _setup(tmp_path, tiny_llama_dir, **training):
    from onecard.data import build_dataset, pad_token_id
    from onecard.train.model import load_model_and_tokenizer

    recipe = recipe_for(tmp_path, tiny_llama_dir, **training)
    model, tokenizer = load_model_and_tokenizer(recipe, "cpu")
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    model.train()
    return recipe, model, build_dataset(recipe, tokenizer).examples, pad_token_id(tokenizer)


def test_right_padding_without_a_mask_trains_the_same_tokens(tmp_path, tiny_llama_dir):
    from onecard.data import collate
    from onecard.train.sft_step import token_ce_sum

    recipe, model, examples, pad = _setup(tmp_path, tiny_llama_dir)
    model.eval()
    masked = collate(examples[:3], pad)
    fixed = graphed_sft.fixed_batch(masked, rows=4, width=64, pad_id=pad)
    assert fixed["input_ids"].shape == (4, 64) and not (fixed["labels"][3] != -100).any()  # a row of pads only
    with torch.no_grad():
        want, n_want = token_ce_sum(model(input_ids=masked["input_ids"],
                                          attention_mask=masked["attention_mask"]).logits, masked["labels"])
        got, n_got = token_ce_sum(model(input_ids=fixed["input_ids"]).logits, fixed["labels"])
        left = {k: torch.flip(v, dims=[1]) for k, v in fixed.items()}  # left padding would not be exact
        wrong, _ = token_ce_sum(model(input_ids=left["input_ids"]).logits, left["labels"])
    assert n_got == n_want
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert abs(float(wrong) - float(want)) > 1e-2


def test_a_micro_batch_larger_than_the_recording_is_refused():
    batch = {k: torch.zeros(2, 9, dtype=torch.long) for k in ("input_ids", "labels", "attention_mask")}
    with pytest.raises(ValueError, match="does not fit the recorded 2 x 8"):
        graphed_sft.fixed_batch(batch, rows=2, width=8, pad_id=0)


def test_the_recorded_window_gives_the_eager_loss_and_gradients(tmp_path, tiny_llama_dir, monkeypatch):
    recipe, model, examples, pad = _setup(tmp_path, tiny_llama_dir, micro_batch_size=3, grad_accum=2,
                                          cuda_graph=True)
    window = [[0, 1, 2], [3]]  # the second micro-batch is short: padded with rows of pads
    eager = SFTStep(model, None, recipe, "cpu", type("D", (), {"examples": examples}), pad, False, None)
    model.zero_grad()
    want = eager.backward(window)
    reference = grads(model)

    replays = []
    monkeypatch.setattr(graphed_step, "capture", lambda m, inputs: replays.append(_EagerReplay(m, inputs))
                        or replays[-1])
    step = graphed_sft.GraphedSFTStep(model, None, recipe, "cpu", type("D", (), {"examples": examples}), pad, True,
                                      None)
    model.zero_grad()
    got = step.backward(window)
    assert len(replays) == 1 and len(replays[0].seen) == 2  # recorded once, replayed per micro-batch
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert (got["tokens"], got["trained_tokens"]) == (want["tokens"], want["trained_tokens"])
    assert max_diff(grads(model), reference) <= 1e-5
    counts = {float(b["num_items_in_batch"]) for b in replays[0].seen}
    assert counts == {float(want["trained_tokens"])}  # the window's count, as a tensor the graph reads


def test_gradients_are_zeroed_in_place_where_the_graph_adds_into_them(tmp_path, tiny_llama_dir):
    recipe, model, examples, pad = _setup(tmp_path, tiny_llama_dir, cuda_graph=True)
    param = next(p for p in model.parameters() if p.requires_grad)
    param.grad = torch.ones_like(param)
    address = param.grad.data_ptr()
    step = graphed_sft.GraphedSFTStep(model, torch.optim.SGD([param], lr=0.1), recipe, "cpu", None, pad, True, None)
    step.zero_grad()
    assert param.grad is not None and param.grad.data_ptr() == address and not param.grad.any()


def test_a_failed_recording_is_a_user_error_naming_the_field(tmp_path, tiny_llama_dir):
    recipe, model, examples, pad = _setup(tmp_path, tiny_llama_dir, cuda_graph=True)
    step = graphed_sft.GraphedSFTStep(model, None, recipe, "cpu", type("D", (), {"examples": examples}), pad, True,
                                      None)
    with pytest.raises(UserError) as err:
        step.backward([[0]])  # a CPU model: capture refuses it
    assert err.value.where == "training.cuda_graph" and "CUDA GPU" in err.value.what


def test_the_step_class_refuses_what_only_the_run_decides(tmp_path, tiny_llama_dir):
    on = recipe_for(tmp_path, tiny_llama_dir, cuda_graph=True)
    assert sft_step_class(recipe_for(tmp_path, tiny_llama_dir), True, False) is SFTStep
    assert sft_step_class(on, False, True) is graphed_sft.GraphedSFTStep
    with pytest.raises(UserError, match="stream from host memory"):
        sft_step_class(on, True, True)
    with pytest.raises(UserError, match="fused linear cross-entropy did not apply"):
        sft_step_class(on, False, False)


@pytest.mark.parametrize("sets, what", [
    (["task=dpo", "data.format=dpo"], "task dpo"),
    (["data.packing=true"], "data.packing"),
    (["training.offload_activations=true"], "training.offload_activations"),
    (["training.offload_weights=true"], "training.offload_weights: true"),
    (["training.kernels=liger"], "training.kernels liger"),
    (["training.fused_ce=false"], "fused_ce False"),
])
def test_lint_refuses_what_a_recorded_step_cannot_hold(sets, what):
    def findings(*extra):
        rec = load_recipe(None, ["model.name_or_path=llama-3-8b", "plan.gpu=h100", *extra])
        return [f for f in lint_recipe(rec, power_reader=lambda: [], version_reader=lambda d: None)
                if f.id == "cuda-graph"]

    assert findings("training.cuda_graph=true") == []
    assert findings(*sets) == []
    (got,) = findings("training.cuda_graph=true", *sets)
    assert got.severity == "error" and what in got.message and got.where == "training.cuda_graph"


def test_lint_refuses_a_recorded_step_on_the_cpu():
    rec = load_recipe(None, ["model.name_or_path=llama-3-8b", "training.cuda_graph=true"])
    found = [f for f in lint_recipe(rec, device="cpu", power_reader=lambda: [], version_reader=lambda d: None)
             if f.id == "cuda-graph"]
    assert found and "a CPU run" in found[0].message


@pytest.mark.gpu
def test_gpu_a_recorded_run_trains_as_the_eager_run(tmp_path, tiny_llama_dir):
    """`onecard train` with and without training.cuda_graph, onecard kernels and checkpoints on: the same logged
    losses within 2e-3 and adapter weights within 5e-3 (bf16; cuBLAS may sum another shape in another order; a stale
    batch, a frozen token count or a missed zeroing is off by far more), and the recorded run logs every step."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import json

    from safetensors.torch import load_file

    from _kernel_env import rel_err
    from onecard.train.loop import train

    runs = {}
    for graph in (False, True):
        (tmp_path / str(graph)).mkdir()
        recipe = recipe_for(tmp_path / str(graph), tiny_llama_dir, cuda_graph=graph, kernels="onecard",
                            grad_ckpt=True, micro_batch_size=3, grad_accum=2, max_steps=4)
        train(recipe)
        runs[graph] = (load_file(str(recipe.run_dir / "adapter" / "adapter_model.safetensors")),
                       [json.loads(x)["loss"] for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()])
    (eager_weights, eager_losses), (graph_weights, graph_losses) = runs[False], runs[True]
    assert len(graph_losses) == len(eager_losses) == 4
    assert graph_losses == pytest.approx(eager_losses, rel=2e-3)
    for name in eager_weights:
        assert rel_err(graph_weights[name].float(), eager_weights[name].float()) <= 5e-3, name


def test_lint_refuses_a_recorded_step_where_the_plan_streams_the_weights():
    def findings(gpu):
        rec = load_recipe(None, ["model.name_or_path=qwen2.5-14b", f"plan.gpu={gpu}", "training.cuda_graph=true"])
        return [f for f in lint_recipe(rec, power_reader=lambda: [], version_reader=lambda d: None)
                if f.id == "cuda-graph"]

    (got,) = findings("rtx4090")  # a bf16 14B base streams on a 24 GB card
    assert "the plan streams the base weights" in got.message
    assert findings("h200") == []
