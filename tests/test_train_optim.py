"""Optimizers, LR schedule parity with transformers, weight-decay groups, metrics helpers."""

from __future__ import annotations

import os

import pytest

from onecard.errors import UserError

os.environ.setdefault("OMP_NUM_THREADS", "1")


def recipe(method="lora", **training):
    from onecard.recipe import validate_recipe

    return validate_recipe({"model": {"name_or_path": "unused"}, "method": method, "training": training})


class Tiny:
    """A module with a matrix, a bias and a frozen tensor: enough to check groups and optimizer steps."""

    def __new__(cls):
        import torch

        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 4, bias=False))
        model[2].weight.requires_grad_(False)
        return model


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_lr_schedule_matches_transformers(kind):
    import torch
    from transformers import get_scheduler

    from onecard.train.optim import lr_factor

    total, warmup = 50, 7
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    name = "constant_with_warmup" if kind == "constant" else kind
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        if step >= warmup:  # the warm-up ramp is shifted so that step 0 trains (test below)
            assert lr_factor(step, total, warmup, kind) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()


def test_first_warmup_step_trains():
    """transformers' warm-up gives step 0 a learning rate of 0, so step 2 repeats step 1's loss; onecard's does not."""
    from onecard.train.optim import lr_factor

    for warmup in (1, 2, 7):
        ramp = [lr_factor(s, 50, warmup, "cosine") for s in range(warmup + 1)]
        assert ramp[0] > 0 and all(a < b for a, b in zip(ramp, ramp[1:])) and ramp[-1] == 1.0


def test_warmup_steps_from_ratio_or_count():
    from onecard.train.optim import warmup_steps

    assert warmup_steps(recipe(warmup_ratio=0.1), 95) == 10
    assert warmup_steps(recipe(warmup_ratio=0.1, warmup_steps=3), 95) == 3


def test_weight_decay_only_on_matrices_of_trainable_params():
    from onecard.train.optim import param_groups

    groups = param_groups(Tiny(), 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in groups] == [1, 3]  # linear weight | linear bias, norm weight, norm bias


@pytest.mark.parametrize("name", ["adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit"])
def test_optimizers_step_on_cpu(name):
    import torch

    from onecard.train.optim import build_optimizer

    model = Tiny()
    before = model[0].weight.detach().clone()
    opt = build_optimizer(model, recipe(optimizer=name, learning_rate=1e-2), "cpu")
    model(torch.randn(3, 64)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, model[0].weight)
    assert model[2].weight.grad is None  # frozen weights are not in the optimizer


def test_cpu_offload_refusals():
    from onecard.train.optim import build_optimizer

    with pytest.raises(UserError, match="without a GPU"):
        build_optimizer(Tiny(), recipe(method="full", optimizer="adamw_cpu_offload"), "cpu")
    with pytest.raises(UserError, match="full fine-tuning"):
        build_optimizer(Tiny(), recipe(method="lora", optimizer="adamw_cpu_offload"), "cuda")


def test_no_trainable_parameters_is_a_user_error():
    from onecard.train.optim import build_optimizer

    model = Tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        build_optimizer(model, recipe(), "cpu")


def test_set_lr_applies_schedule_to_every_group():
    from onecard.train.optim import build_optimizer, set_lr

    r = recipe(learning_rate=2e-3, lr_scheduler="linear", warmup_steps=0)
    opt = build_optimizer(Tiny(), r, "cpu")
    assert set_lr(opt, r, 5, 10) == pytest.approx(1e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3])


def test_peak_memory_on_cpu_is_rss():
    from onecard.train.metrics import peak_memory_bytes

    peak, kind = peak_memory_bytes("cpu")
    assert kind == "process_peak_rss" and peak > 10 * 2**20


def test_metrics_logger_rewrites_from_checkpoint_records(tmp_path):
    import json

    from onecard.train.metrics import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    logger = MetricsLogger(tmp_path, [{"step": 1}, {"step": 2}])  # the checkpoint knew steps 1-2 only
    logger.log({"step": 3, "loss": 1.5})
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and lines[-1]["loss"] == 1.5
