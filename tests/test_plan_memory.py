"""Memory plan outcomes (acceptance 3) and invariants of the estimated terms."""

from __future__ import annotations

import pytest

from onecard.catalog.gpus import GPUS
from onecard.catalog.models import PRESETS
from onecard.plan.inputs import PlanInputs, inputs_from_recipe
from onecard.plan.memory import GIB, plan_memory
from onecard.plan.suggest import suggest_fixes
from onecard.recipe import load_recipe


def inputs(model="llama-3-8b", gpu="rtx4090", **kw) -> PlanInputs:
    kernels = kw.pop("kernels", "onecard")
    kw.setdefault("fused_ce", kernels != "none")
    return PlanInputs(shape=PRESETS[model], gpu=GPUS[gpu], kernels=kernels, **kw)


def test_llama3_8b_lora_batch8_plain_does_not_fit_4090_but_batch1_does():
    assert plan_memory(inputs(micro_batch=8, kernels="none")).verdict == "does not fit"
    assert plan_memory(inputs(micro_batch=1, kernels="none")).fits          # measured: plain fits only micro-batch 1
    assert not plan_memory(inputs(micro_batch=2, kernels="none")).fits


def test_llama3_70b_qlora_batch1_does_not_fit_4090():
    plan = plan_memory(inputs("llama-3-70b", method="qlora", micro_batch=1))
    assert plan.verdict == "does not fit"
    assert plan.component("weights").bytes > 24 * GIB


def test_llama3_8b_lora_batch1_with_checkpointing_fits_4090():
    assert plan_memory(inputs(micro_batch=1, grad_ckpt=True)).fits


def test_h200_reference_measurements_within_10_percent():
    """H200, Llama 3 8B, LoRA r16 x 7 projections, seq 2048, micro-batch 8, checkpointing: peak reserved
    50.5 GiB plain transformers + peft, 25.7 GiB with liger-kernel. Formulas are physical, not fitted to these."""
    plain = plan_memory(inputs(gpu="h200", micro_batch=8, kernels="none"))
    liger = plan_memory(inputs(gpu="h200", micro_batch=8, kernels="liger"))
    assert plain.allocator_bytes / GIB == pytest.approx(50.5, rel=0.10)
    assert liger.allocator_bytes / GIB == pytest.approx(25.7, rel=0.10)
    assert plain.peak_phase == "logits + cross-entropy"


def test_under_24gb_largest_batches_match_measured():
    """Issue 6, under a 24 GB cap: largest micro-batch 1 plain, 4 with liger."""
    def largest(kernels):
        return max(b for b in range(1, 17) if plan_memory(inputs(micro_batch=b, kernels=kernels)).verdict == "fits")
    assert largest("none") == 1
    assert largest("liger") == 4


def test_components_sum_to_total_and_paged_state_is_separate():
    plan = plan_memory(inputs(method="qlora", optimizer="paged_adamw_8bit", micro_batch=2))
    peak = [c for c in plan.components if c.at_peak and c.where == "device"]
    assert sum(c.bytes for c in peak) == plan.total_bytes
    opt = plan.component("optimizer")
    assert not opt.in_allocator and plan.spillable_bytes == opt.bytes
    assert plan.allocator_bytes + plan.component("cuda_context").bytes == plan.required_bytes


def test_cpu_offload_moves_optimizer_to_host():
    on_gpu = plan_memory(inputs("llama-3.2-1b", method="full"))
    offload = plan_memory(inputs("llama-3.2-1b", method="full", optimizer="adamw_cpu_offload"))
    assert offload.component("optimizer").where == "host"
    assert offload.total_bytes < on_gpu.total_bytes
    assert offload.host_bytes >= offload.component("optimizer").bytes


@pytest.mark.parametrize("change", [dict(grad_ckpt=False), dict(fused_ce=False), dict(seq_len=4096),
                                    dict(micro_batch=2), dict(method="dora"), dict(task="dpo")])
def test_each_costlier_setting_costs_memory(change):
    base = plan_memory(inputs(micro_batch=1, kernels="onecard"))
    assert plan_memory(inputs(micro_batch=1, kernels="onecard").with_(**change)).total_bytes > base.total_bytes


def test_eager_attention_has_a_seq_squared_term():
    sdpa = [plan_memory(inputs(seq_len=s, grad_ckpt=False, attn="sdpa")).total_bytes for s in (1024, 2048, 4096)]
    eager = [plan_memory(inputs(seq_len=s, grad_ckpt=False, attn="eager")).total_bytes for s in (1024, 2048, 4096)]
    assert all(e > s for e, s in zip(eager, sdpa))
    assert (eager[2] - sdpa[2]) / (eager[1] - sdpa[1]) == pytest.approx(4, rel=0.05)


def test_dpo_lora_reference_is_adapter_disabled_full_reference_is_a_copy():
    lora = plan_memory(inputs(task="dpo", reference="adapter-disabled"))
    full = plan_memory(inputs("llama-3.2-1b", method="full", task="dpo", reference="copy"))
    assert lora.component("reference") is None and lora.component("reference_pass") is not None
    assert full.component("reference").bytes == full.component("weights").bytes


def test_fsdp_shards_static_terms():
    """num_gpus > 1 is FSDP, which onecard trains without its kernels: compared with one GPU without them too."""
    one = plan_memory(inputs("llama-3.2-1b", method="full", kernels="none"))
    four = plan_memory(inputs("llama-3.2-1b", method="full", num_gpus=4))
    assert four.inputs.kernels == "none" and not four.inputs.fused_ce
    assert inputs("llama-3.2-1b", method="full").kernels == "onecard"
    for key in ("weights", "gradients", "optimizer"):
        assert four.component(key).bytes == pytest.approx(one.component(key).bytes / 4, abs=4)
    assert four.component("activations").bytes == one.component("activations").bytes


def test_verdicts_and_tight_band():
    plan = plan_memory(inputs(micro_batch=1))
    assert plan.verdict == "fits" and plan.total_bytes < 0.95 * plan.capacity_bytes
    tight = [b for b in range(1, 12) if plan_memory(inputs(micro_batch=b, kernels="liger")).verdict == "tight"]
    for b in tight:
        p = plan_memory(inputs(micro_batch=b, kernels="liger"))
        assert 0.95 * p.capacity_bytes < p.total_bytes <= p.capacity_bytes


def test_suggestions_each_fit_and_keep_effective_batch():
    plan = plan_memory(inputs(micro_batch=8, grad_accum=4, kernels="none"))
    fixes = suggest_fixes(plan)
    assert fixes and all(s.verdict != "does not fit" for s in fixes)
    assert all(s.total_bytes <= plan.capacity_bytes for s in fixes if "plan.gpu" not in s.set)
    mb = next(s for s in fixes if s.change.startswith("micro-batch"))
    assert mb.set["training.micro_batch_size"] * mb.set["training.grad_accum"] == 32
    assert any("rtx5090" in s.change or "l40s" in s.change or "a100" in s.change or "h100" in s.change
               for s in fixes)
    assert suggest_fixes(plan_memory(inputs(micro_batch=1))) == []


def test_70b_qlora_on_a_4090_suggests_a_larger_card_or_more_4090s_that_load_and_step():
    """More 4090s hold the sharded step, and with low-memory loading each loads only its shards (plan/fsdp_load.py):
    the count proposed fits both phases."""
    fixes = suggest_fixes(plan_memory(inputs("llama-3-70b", method="qlora")))
    assert any("larger card" in s.change for s in fixes)
    fsdp = [s for s in fixes if "FSDP" in s.change]
    assert len(fsdp) == 1
    more = plan_memory(inputs("llama-3-70b", method="qlora", num_gpus=fsdp[0].set["training.num_gpus"]))
    assert more.fits and 0 < more.load_bytes < more.capacity_bytes


def test_recipe_kernels_auto_resolves_against_target_card():
    recipe = load_recipe(None, ["model.name_or_path=llama-3-8b", "plan.gpu=l4"])
    inp = inputs_from_recipe(recipe)
    assert inp.kernels == "onecard" and inp.fused_ce and inp.gpu.id == "l4"
    recipe = load_recipe(None, ["model.name_or_path=llama-3-8b", "training.kernels=none"])
    assert not inputs_from_recipe(recipe).fused_ce


def test_plan_never_imports_torch():
    from _no_torch import assert_runs_without_torch

    assert_runs_without_torch("from onecard.plan.scope import scope_table; from onecard.catalog.gpus import GPUS; "
                              "import onecard.commands.plan, onecard.lint; scope_table(GPUS['rtx4090'])")


def test_preference_tasks_are_planned_without_fused_kernels():
    """DPO/KTO train on plain modules with full logits (train/preference.py), whatever kernels: auto says."""
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.recipe import validate_recipe

    for task, expected in (("sft", "onecard"), ("dpo", "none"), ("kto", "none")):
        recipe = validate_recipe({"model": {"name_or_path": "llama-3-8b"}, "task": task, "plan": {"gpu": "h200"}})
        inp = inputs_from_recipe(recipe)
        assert inp.kernels == expected
        assert inp.fused_ce is (expected == "onecard")


def test_preference_suggestions_never_offer_fused_kernels():
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import plan_memory
    from onecard.plan.suggest import suggest_fixes
    from onecard.recipe import validate_recipe

    recipe = validate_recipe({"model": {"name_or_path": "llama-3-8b"}, "task": "dpo", "data": {"seq_len": 2048},
                              "training": {"micro_batch_size": 4}, "plan": {"gpu": "rtx4090"}})
    fixes = suggest_fixes(plan_memory(inputs_from_recipe(recipe)))
    assert fixes and not any("kernels" in str(f) for f in fixes)


def test_offloaded_checkpoints_of_patched_layers_are_planned_per_half():
    """patch/blocks.py: with onecard's kernels each layer offloads two inputs (x and x + attn(x)) and recomputes one
    half at a time; without the kernels, or on a family without a decoder_class, the layer stays whole."""
    from onecard.plan.activations import head_activation_bytes_per_token, layer_activation_parts_per_token

    split = inputs(gpu="h200", micro_batch=8, offload_activations=True)
    whole = inputs(gpu="h200", micro_batch=8, offload_activations=True, kernels="none")
    assert split.split_halves and not whole.split_halves
    assert not inputs(gpu="h200", micro_batch=8).split_halves  # not offloaded: whole layers on the GPU
    assert not inputs("gemma-2-2b", gpu="h200", micro_batch=8, offload_activations=True).split_halves
    s = plan_memory(split)
    unsplit = plan_memory(split.with_(kernels="onecard", offload_activations=False))
    shape, tokens = split.shape, split.tokens_per_micro_batch
    one_input = 2 * shape.hidden_size * tokens
    head = head_activation_bytes_per_token(shape, "onecard") * tokens
    assert s.component("activations").bytes == 2 * one_input + head  # one in use, one prefetched; the head's stay
    assert s.component("activations_host").bytes == 2 * shape.num_hidden_layers * one_input - 2 * one_input
    parts = layer_activation_parts_per_token(shape, method="lora", targets=split.targets, rank=16, kernels="onecard",
                                             attn="sdpa", seq_len=2048)
    saved = unsplit.component("block_backward").bytes - s.component("block_backward").bytes
    assert saved == min(parts.values()) * tokens  # only the larger half is recomputed at a time


def test_a_fitting_plan_with_checkpoints_on_the_gpu_is_told_about_offloading_them():
    """also_worth_it: offloading with onecard's kernels (split halves) holds less and recomputes less, so a plan that
    fits hears of it; not without the kernels, not when already offloaded, not without checkpointing (the layers it
    has room to leave out of the checkpoints are tests/test_uncheckpointed_layers.py's)."""
    from onecard.plan.suggest import also_worth_it

    def offload_hints(plan):
        return [s for s in also_worth_it(plan) if "training.offload_activations" in s.set]

    plan = plan_memory(inputs(micro_batch=8))  # 8B LoRA b8 on the 4090: tight, checkpoints on the GPU
    (extra,) = offload_hints(plan)
    offloaded = plan_memory(inputs(micro_batch=8, offload_activations=True))
    assert extra.set == {"training.offload_activations": True} and extra.total_bytes == offloaded.total_bytes
    assert offloaded.total_bytes < plan.total_bytes and "halves" in extra.change
    assert offload_hints(plan_memory(inputs(micro_batch=1, kernels="none"))) == []
    assert offload_hints(offloaded) == []
    no_ckpt = plan_memory(inputs(gpu="h200", micro_batch=1, grad_ckpt=False))
    assert no_ckpt.fits and also_worth_it(no_ckpt) == []


def test_adapter_copies_are_planned_only_where_the_fused_layers_make_them():
    """The compute-dtype A/B copies exist for onecard's fused layers, which LoRA dropout > 0 hands to peft."""
    def copies(**kw):
        row = plan_memory(inputs(micro_batch=1, **kw)).component("adapter_copies")
        return 0 if row is None else row.bytes

    lora_params = 41_943_040  # Llama 3 8B r16 on all seven projections (peft's print_trainable_parameters)
    assert copies() == lora_params * 2
    assert copies(lora_dropout=0.05) == 0 and copies(kernels="none") == 0
    rec = load_recipe(None, ["model.name_or_path=llama-3-8b", "adapter.dropout=0.05"])
    assert inputs_from_recipe(rec).lora_dropout == 0.05
    assert inputs_from_recipe(load_recipe(None, ["model.name_or_path=llama-3-8b", "method=full",
                                                  "adapter.dropout=0.05"])).lora_dropout == 0.0


def test_a_graphed_step_holds_every_gradient_and_an_eval_beside_its_pool():
    """Replayed from a CUDA graph, a step keeps all adapter gradients between replays, and a held-out eval between
    steps cannot reuse the graph's pool: both add to the eager plan; eager runs fit the eval inside the step."""
    eager = inputs(micro_batch=8, gpu="h200")
    graphed = inputs(micro_batch=8, gpu="h200", cuda_graph=True)
    grads = plan_memory(eager).component("gradients").bytes
    assert plan_memory(eager).component("gradients_at_peak").bytes == 0  # LoRA: freed activations outweigh them
    assert plan_memory(graphed).component("gradients_at_peak").bytes == grads > 0
    with_eval = plan_memory(inputs(micro_batch=8, gpu="h200", cuda_graph=True, heldout_loss=True))
    eval_bytes = with_eval.component("eval_beside_graph").bytes
    assert 1.5 * GIB < eval_bytes < 3 * GIB  # one 8 x 2,048-token no-grad forward of an 8B
    assert with_eval.allocator_bytes == pytest.approx(plan_memory(graphed).allocator_bytes + 1.05 * eval_bytes, rel=1e-3)
    assert plan_memory(inputs(micro_batch=8, gpu="h200", heldout_loss=True)).allocator_bytes == \
        plan_memory(eager).allocator_bytes


def test_graphed_steps_are_planned_within_2_percent_of_their_pools():
    """bench/graph_memory_gpu.py's rows (one process each: eager and graphed, then an eval between steps): peak
    reserved after the steps and after the eval, against today's plan of each row's configuration."""
    import dataclasses
    import json
    from pathlib import Path

    from onecard.bench.config import BenchConfig

    files = sorted((Path(__file__).parents[1] / "bench" / "results").rglob("graph_memory_*.jsonl"))
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "error" not in r]
    assert {r["mode"] for r in rows} == {"eager", "graph"} and len(rows) >= 4
    for r in rows:
        plan = inputs_from_recipe(BenchConfig(**r["config"]).to_recipe(), gpu=r["config"]["gpu"])
        for measured, eval_between in ((r["steps_max_reserved_gib"], False), (r["eval_max_reserved_gib"], True)):
            planned = plan_memory(dataclasses.replace(plan, heldout_loss=eval_between)).allocator_bytes / GIB
            assert abs(planned / measured - 1) < 0.02, (r["case"], r["mode"], eval_between, planned, measured)


def test_a_graphed_recipe_is_not_told_to_offload_without_losing_the_graph():
    """A CUDA graph cannot hold host copies: for a graphed plan that fits, offloaded checkpoints are not 'also worth
    it'; for one that does not fit, every fix that offloads or streams also turns the graph off, and says so."""
    from onecard.plan.suggest import also_worth_it

    fits = inputs("qwen2.5-14b", gpu="rtx4090", micro_batch=1, quant_base="fp8")
    offload = {"training.offload_activations": True}
    assert any(s.set == offload for s in also_worth_it(plan_memory(fits)))  # eager: offloading is worth it
    assert not [s for s in also_worth_it(plan_memory(fits.with_(cuda_graph=True)))
                if s.set.get("training.offload_activations")]
    tight = fits.with_(micro_batch=8, cuda_graph=True)
    fixes = suggest_fixes(plan_memory(tight))
    host_fixes = [s for s in fixes if s.set.get("training.offload_activations") or s.set.get("training.offload_weights")]
    assert host_fixes, [s.change for s in fixes]
    for s in host_fixes:
        assert s.set["training.cuda_graph"] is False and "without the CUDA graph" in s.change
    assert all("training.cuda_graph" not in s.set for s in suggest_fixes(plan_memory(tight.with_(cuda_graph=False))))
