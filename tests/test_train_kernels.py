"""The trainer with onecard's kernels: the fused linear-CE loss gives the same gradients and the same run.

``kernels: onecard`` patches the model instance (onecard.patch); the loop then asks the model for the loss
summed over the window's trained tokens (``num_items_in_batch``) instead of computing it from full logits.
Both paths must agree: same accumulated gradient (fp32, CPU), same losses over a short run.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from test_train_accum import grads, max_diff, recipe_for  # noqa: E402


def test_fused_loss_gives_the_same_window_gradient(tmp_path, tiny_llama_dir):
    from onecard.data import build_dataset, collate, pad_token_id
    from onecard.train.sft import apply_recipe_kernels
    from onecard.train.sft_step import accumulate_gradients
    from onecard.train.spine import seed_everything
    from onecard.train.model import load_model_and_tokenizer

    recipe = recipe_for(tmp_path, tiny_llama_dir, kernels="onecard")
    results = {}
    for fused in (False, True):
        seed_everything(recipe.training.seed)
        model, tok = load_model_and_tokenizer(recipe, "cpu")
        applied = apply_recipe_kernels(model, recipe, "cpu") if fused else None
        assert applied is None or applied.fused_loss
        data = build_dataset(recipe, tok)
        micro = [collate([ex], pad_token_id(tok)) for ex in data.examples]
        model.train()
        loss, n = accumulate_gradients(model, micro, "cpu", fused_loss=fused)
        results[fused] = (loss, n, grads(model))
    (loss_a, n_a, g_a), (loss_b, n_b, g_b) = results[False], results[True]
    assert n_a == n_b > 0
    assert abs(loss_a - loss_b) < 1e-5 * max(1.0, abs(loss_a))
    assert max_diff(g_a, g_b) < 1e-5


def test_kernels_on_and_off_train_alike_and_summary_says_which(tmp_path, tiny_llama_dir):
    from onecard.train.loop import train

    summaries = {}
    for kernels in ("none", "onecard"):
        (tmp_path / kernels).mkdir()
        # 3 steps of 2 micro-batches: on the CPU onecard's kernels run in Triton's interpreter, one program per token
        recipe = recipe_for(tmp_path / kernels, tiny_llama_dir, kernels=kernels, max_steps=3, grad_accum=2)
        summaries[kernels] = train(recipe)
        metrics = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
        summaries[kernels]["losses"] = [m["loss"] for m in metrics]
    assert summaries["none"]["kernels"] == "none" and summaries["onecard"]["kernels"] == "onecard"
    assert summaries["none"]["kernels_patched"] == {}
    assert summaries["onecard"]["kernels_patched"]["mlp"] == 2  # one per layer of the tiny llama
    assert summaries["onecard"]["varlen_attention_calls"] == 0  # unpacked rows (and CPU)
    for a, b in zip(summaries["none"]["losses"], summaries["onecard"]["losses"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a))


def test_summary_on_gpu_carries_plan_vs_measured_lines():
    """The comparison the trainer attaches on CUDA renders with errors in % (checked without a GPU)."""
    from onecard.plan.compare import format_lines, plan_vs_measured
    from onecard.recipe import validate_recipe

    recipe = validate_recipe({"model": {"name_or_path": "llama-3-8b"}, "data": {"seq_len": 2048},
                              "training": {"micro_batch_size": 8}})
    result = plan_vs_measured(recipe, {"peak_reserved_bytes": 26 * 2**30, "tokens_per_s": 9000.0,
                                       "device_name": "NVIDIA H200"})
    assert result["gpu"] == "h200" and "planner_error" not in result
    assert result["peak_error_pct"] == round(100 * (result["predicted_peak_reserved_gib"] - 26) / 26, 1)
    lines = format_lines(result)
    assert "measured 26.00 GiB" in lines[0] and "%" in lines[0] and "9,000" in lines[1]


def test_plan_vs_measured_plans_the_run_s_real_lengths():
    """Memory is planned at the longest example, speed at the mean one, not at the recipe's seq_len ceiling."""
    from onecard.plan.compare import plan_vs_measured
    from onecard.recipe import validate_recipe

    recipe = validate_recipe({"model": {"name_or_path": "llama-3.2-1b"}, "data": {"seq_len": 2048},
                              "training": {"micro_batch_size": 4}})
    measured = {"peak_reserved_bytes": 10 * 2**30, "tokens_per_s": 5000.0, "device_name": "NVIDIA H200"}
    full = plan_vs_measured(recipe, measured)
    short = plan_vs_measured(recipe, measured, seq_len_memory=300, seq_len_speed=120)
    assert short["planned_seq_len"] == {"memory": 300, "speed": 120}
    assert full["planned_seq_len"] == {"memory": 2048, "speed": 2048}
    assert short["predicted_peak_reserved_gib"] < full["predicted_peak_reserved_gib"]


def test_plan_vs_measured_of_a_streamed_run_plans_the_streaming_that_ran():
    """A run that streamed all but N layers is compared with the plan of that (the bench's streamed-row figure),
    not with the whole base on the card."""
    from onecard.bench.config import BenchConfig
    from onecard.bench.predict import peak_memory
    from onecard.plan.compare import plan_vs_measured
    from onecard.recipe import validate_recipe

    tree = {"model": {"name_or_path": "llama-3-8b"}, "data": {"seq_len": 1024},
            "training": {"micro_batch_size": 2, "offload_activations": True, "offload_weights": True}}
    measured = {"peak_reserved_bytes": 10 * 2**30, "tokens_per_s": 1000.0, "device_name": "NVIDIA H200"}
    whole = plan_vs_measured(validate_recipe(tree), measured)
    streamed = plan_vs_measured(validate_recipe(tree), measured, resident_layers=11)
    assert streamed["planned_resident_layers"] == 11 and "streaming" in streamed["predicted_tokens_per_s_label"]
    assert whole["predicted_peak_reserved_gib"] - streamed["predicted_peak_reserved_gib"] > 5  # 18 of 32 layers off
    assert streamed["predicted_tokens_per_s"] <= whole["predicted_tokens_per_s"]
    bench = peak_memory(BenchConfig(model="llama-3-8b", seq=1024, micro_batch=2, kernels="onecard", gpu="h200",
                                    offload_activations=True, offload_weights=True, resident_layers=11))
    assert abs(streamed["predicted_peak_reserved_gib"] - bench["predicted_peak_gib"]) < 0.5  # the same model


def test_row_length_of_sft_and_preference_examples():
    from onecard.data.store import row_token_count as row_length

    assert row_length({"input_ids": [1, 2, 3], "labels": [1, 2, 3]}) == 3
    assert row_length({"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]}) == 5
    assert row_length({"prompt_ids": [1], "completion_ids": [2, 3]}) == 3
