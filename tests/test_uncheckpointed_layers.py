"""training.uncheckpointed_layers: the last N decoder layers trained without activation checkpoints -- the trainer
leaves them out (same gradients, no recompute for them), the planner holds their activations and drops their
recompute, and lint, suggestions and streaming treat the combination as the trainer does."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _kernel_env  # noqa: E402,F401

from onecard.catalog.gpus import GPUS  # noqa: E402
from onecard.catalog.models import PRESETS  # noqa: E402
from onecard.errors import UserError  # noqa: E402
from onecard.lint import lint_recipe  # noqa: E402
from onecard.plan.flops import flops_for_inputs  # noqa: E402
from onecard.plan.inputs import PlanInputs  # noqa: E402
from onecard.plan.memory import plan_memory  # noqa: E402
from onecard.plan.speed import estimate_throughput  # noqa: E402
from onecard.plan.streaming import streaming_chosen  # noqa: E402
from onecard.plan.suggest import also_worth_it, most_uncheckpointed_layers, suggest_fixes  # noqa: E402
from onecard.recipe import load_recipe  # noqa: E402


def _inputs(model="llama-3-8b", gpu="rtx4090", **kw) -> PlanInputs:
    return PlanInputs(shape=PRESETS[model], gpu=GPUS[gpu], kernels="onecard", fused_ce=True, **kw)


def _component(plan, key) -> int:
    found = plan.component(key)
    return 0 if found is None else found.bytes


def test_recipe_refuses_it_without_checkpointing():
    with pytest.raises(UserError, match="uncheckpointed_layers"):
        load_recipe(None, ["model.name_or_path=llama-3-8b", "training.grad_ckpt=false",
                           "training.uncheckpointed_layers=4"])


@pytest.mark.parametrize("offload", [False, True])
def test_each_layer_left_out_holds_its_activations_instead_of_its_checkpoint(offload):
    base = plan_memory(_inputs(offload_activations=offload))
    one, four = (plan_memory(_inputs(offload_activations=offload, uncheckpointed_layers=k)) for k in (1, 4))
    step = _component(one, "activations") - _component(base, "activations")
    assert step > 0
    assert _component(four, "activations") - _component(base, "activations") == 4 * step
    if offload:  # the host no longer holds their checkpoints
        assert _component(four, "activations_host") < _component(base, "activations_host")
    assert four.total_bytes > one.total_bytes > base.total_bytes


def test_all_layers_left_out_hold_what_no_checkpointing_holds():
    every = plan_memory(_inputs(uncheckpointed_layers=32))
    none = plan_memory(_inputs(grad_ckpt=False))
    assert _component(every, "activations") == _component(none, "activations")


def test_recompute_flops_shrink_with_the_checkpointed_share():
    full = flops_for_inputs(_inputs())
    quarter = flops_for_inputs(_inputs(uncheckpointed_layers=24))
    assert quarter.term("recompute_forward") == pytest.approx(full.term("recompute_forward") / 4)
    assert quarter.term("recompute_attention") == pytest.approx(full.term("recompute_attention") / 4)
    assert quarter.term("forward_matmul") == full.term("forward_matmul")
    assert flops_for_inputs(_inputs(uncheckpointed_layers=32)).term("recompute_forward") == 0


def test_planned_speed_rises_with_layers_left_out():
    rates = [estimate_throughput(_inputs(gpu="h200", micro_batch=8, uncheckpointed_layers=k)).estimate_tokens_per_s
             for k in (0, 16, 32)]
    assert rates[0] < rates[1] < rates[2]


def test_the_most_that_fit_is_the_last_that_fits():
    p = _inputs()
    k = most_uncheckpointed_layers(p)
    assert 0 < k < 32
    assert plan_memory(p.with_(uncheckpointed_layers=k)).verdict == "fits"
    assert plan_memory(p.with_(uncheckpointed_layers=k + 1)).verdict != "fits"


def test_a_plan_with_room_suggests_it_and_one_without_gives_it_back_first():
    p = _inputs()
    k = most_uncheckpointed_layers(p)
    hint = [s for s in also_worth_it(plan_memory(p)) if "training.uncheckpointed_layers" in s.set]
    assert hint and hint[0].set["training.uncheckpointed_layers"] == k
    over = plan_memory(p.with_(uncheckpointed_layers=32))
    assert not over.fits
    first = suggest_fixes(over)[0]
    assert first.set == {"training.uncheckpointed_layers": k} and first.verdict == "fits"


def test_streaming_is_not_planned_beside_it():
    over = plan_memory(_inputs(model="qwen2.5-14b", uncheckpointed_layers=4))
    assert not over.fits and not streaming_chosen(over)
    assert streaming_chosen(plan_memory(_inputs(model="qwen2.5-14b")))
    assert not any("offload_weights" in s.set for s in suggest_fixes(over))


def _lint(*sets):
    rec = load_recipe(None, ["model.name_or_path=llama-3-8b", *sets])
    return [f for f in lint_recipe(rec, power_reader=lambda: [], version_reader=lambda dist: None)
            if f.id == "uncheckpointed-layers"]


def test_lint_counts_the_models_layers_and_refuses_streaming_beside_it():
    assert not _lint("training.uncheckpointed_layers=8")
    assert [f.severity for f in _lint("training.uncheckpointed_layers=33")] == ["error"]
    assert "stream" in _lint("training.uncheckpointed_layers=2", "training.offload_weights=true")[0].why


# --- the trainer: transformers' flag per layer ------------------------------------------------------------------


def _checkpointed_lora_model(uncheckpointed: int):
    import transformers
    from peft import LoraConfig, get_peft_model

    from onecard.tiny import tiny_config
    from onecard.train.model import enable_grad_ckpt

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        tiny_config("llama", vocab_size=300, intermediate_size=96, num_hidden_layers=3), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    recipe = load_recipe(None, ["model.name_or_path=llama-3-8b", f"training.uncheckpointed_layers={uncheckpointed}"])
    enable_grad_ckpt(model, recipe)
    model.train()
    return model


def _grads_and_mlp_calls(model):
    from onecard.patch.stream_weights import decoder_layers

    calls = [0] * len(decoder_layers(model))
    # a pre-hook: torch's recompute stops inside the MLP once the last saved tensor is back (no post-hook then)
    hooks = [layer.mlp.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(decoder_layers(model))]
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, calls


def test_the_last_layers_run_once_with_the_same_gradients():
    all_ckpt, calls_all = _grads_and_mlp_calls(_checkpointed_lora_model(0))
    some, calls_some = _grads_and_mlp_calls(_checkpointed_lora_model(2))
    assert calls_all == [2, 2, 2]  # forward and the recompute
    assert calls_some == [2, 1, 1]
    for name, g in all_ckpt.items():
        assert torch.equal(g, some[name]), name


def test_more_than_the_model_has_is_a_user_error():
    with pytest.raises(UserError, match="3 decoder layers"):
        _checkpointed_lora_model(4)


def test_bench_rows_carry_it_in_their_command_and_recipe():
    from onecard.bench.config import BenchConfig

    cfg = BenchConfig(model="qwen2.5-14b", micro_batch=2, kernels="onecard", uncheckpointed_layers=10)
    assert "--uncheckpointed-layers 10" in cfg.command() and "last10-not" in cfg.label()
    assert cfg.to_recipe().training.uncheckpointed_layers == 10
    with pytest.raises(UserError):
        BenchConfig(model="qwen2.5-14b", grad_ckpt=False, uncheckpointed_layers=1)


def test_onecard_train_runs_it_and_stops_on_too_many(tmp_path, tiny_llama_dir, capsys):
    from test_train_cli import assert_user_error, run_cli, write_recipe

    recipe = write_recipe(tmp_path, tiny_llama_dir)
    on = ["--set", "training.grad_ckpt=true", "--set", "training.uncheckpointed_layers=1"]
    code, _, err = run_cli(["train", str(recipe), *on], capsys)
    assert code == 0, err
    code, _, err = run_cli(["train", str(recipe), "--set", "training.grad_ckpt=true", "--set",
                            "training.uncheckpointed_layers=5", "--set", "name=too-many"], capsys)
    assert_user_error(code, err, "uncheckpointed_layers")
    assert not (tmp_path / "runs" / "too-many").exists()  # stopped by lint, before the run directory
    code, _, err = run_cli(["train", str(recipe), "--set", "training.uncheckpointed_layers=1", "--set",
                            "name=no-ckpt"], capsys)
    assert_user_error(code, err, "grad_ckpt")


def test_room_for_every_layer_suggests_checkpointing_off():
    plan = plan_memory(_inputs(gpu="h200"))  # 8B LoRA b1 on 141 GiB
    hints = [s for s in also_worth_it(plan) if "training.grad_ckpt" in s.set]
    assert [h.set["training.grad_ckpt"] for h in hints] == [False]
    assert not any("training.uncheckpointed_layers" in s.set and s.set["training.uncheckpointed_layers"]
                   for s in also_worth_it(plan))


def test_the_probe_tries_the_most_layers_that_fit_without_checkpoints():
    """For each checkpointed setting that fits, the probe also measures it with as many of its last layers out of
    the checkpoints as the planner fits under the cap, first; when that measures fastest the answer sets it."""
    from onecard.bench.probe import probe, summary_lines
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.recipe import validate_recipe

    recipe = validate_recipe({"model": {"name_or_path": "llama-3-8b"}, "data": {"seq_len": 2048}})
    seen = []

    def fake_measure(cfg):
        seen.append(cfg)
        if not cfg.grad_ckpt or cfg.micro_batch > 2:
            return {"status": "oom"}
        speed = cfg.micro_batch * 100 * (1.1 if cfg.uncheckpointed_layers else 1.0)
        return {"status": "ok", "tokens_per_s": speed, "peak_reserved_gib": 20.0}

    out = probe(recipe, cap_gib=24, gpu="rtx4090", measure=fake_measure)
    partial = [c for c in seen if c.uncheckpointed_layers]
    assert partial
    for cfg in partial:
        inp = inputs_from_recipe(cfg.to_recipe(), gpu="rtx4090").with_(uncheckpointed_layers=0).capped(24)
        assert cfg.uncheckpointed_layers == most_uncheckpointed_layers(inp)
    k = out["best"]["uncheckpointed_layers"]
    assert k > 0 and f"training.uncheckpointed_layers={k}" in out["set"]
    assert f"but the last {k} layers" in "\n".join(summary_lines(out, 24))
