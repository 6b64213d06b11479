"""Acceptance 1: on a tiny model, DPO and KTO learn a preference that is learnable by construction.

The synthetic data (test_preference_data.dpo_rows / kto_rows): completions share a random prefix and end in
' yes' (chosen / desirable) or ' no' (rejected / undesirable). Held-out pairs use different prompts and
prefixes. Accuracy counts ties as wrong, so the untrained model (all rewards 0) scores 0.
"""

from __future__ import annotations

import os

import pytest

from test_preference_data import dpo_rows, kto_rows, preference_tree, write_jsonl

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _recipe(tmp_path, model_dir, task, steps, **sections):
    from onecard.recipe import validate_recipe

    rows, held_out = (dpo_rows(48, 1), dpo_rows(24, 2)) if task == "dpo" else (kto_rows(48, 1), kto_rows(24, 2))
    tree = preference_tree(tmp_path, model_dir, task, name=task, rows=rows,
                           data={"eval_path": write_jsonl(tmp_path / "held_out.jsonl", held_out)},
                           training={"max_steps": steps, "micro_batch_size": 4, "grad_accum": 2,
                                     "learning_rate": 1e-2, "lr_scheduler": "constant"}, **sections)
    return validate_recipe(tree)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_learns_held_out_preference(tmp_path, tiny_llama_dir, loss_type):
    import json

    from onecard.train.loop import train

    recipe = _recipe(tmp_path, tiny_llama_dir, "dpo", steps=10, preference={"loss_type": loss_type})
    summary = train(recipe)  # through the spine's entry point: task dpo dispatches to train/preference.py
    assert summary["eval_examples"] == 24
    assert summary["eval_reward_accuracy"] >= 0.8, summary
    assert summary["eval_reward_margin"] > 0, summary
    records = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    for key in ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
        assert all(key in r for r in records), key
    assert records[0]["reward_accuracy"] == 0.0  # step 1: policy == reference, every reward 0, ties are wrong
    assert records[-1]["loss"] < records[0]["loss"]
    assert (recipe.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert any((recipe.run_dir / "tb").iterdir())


def test_kto_learns_held_out_labels(tmp_path, tiny_llama_dir):
    import json

    from onecard.train.loop import train

    recipe = _recipe(tmp_path, tiny_llama_dir, "kto", steps=10)
    summary = train(recipe)
    assert summary["eval_reward_accuracy"] >= 0.8, summary
    assert summary["eval_reward_desirable"] > 0 > summary["eval_reward_undesirable"], summary
    assert summary["eval_reward_margin"] > 0
    records = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "kl", "reward_desirable", "reward_undesirable", "reward_accuracy"):
        assert all(key in r for r in records), key
    assert records[-1]["loss"] < records[0]["loss"]


def test_untrained_policy_scores_zero_on_held_out(tmp_path, tiny_llama_dir):
    """Control: the same evaluation on the starting model gives accuracy 0 (all ties), so the thresholds above
    measure learning, not the metric."""
    from onecard.data import pad_token_id
    from onecard.data.preference import build_preference_dataset
    from onecard.train.model import load_model_and_tokenizer
    from onecard.train.preference_reference import setup_reference
    from onecard.train.preference_step import evaluate_preferences

    recipe = _recipe(tmp_path, tiny_llama_dir, "dpo", steps=1)
    model, tok = load_model_and_tokenizer(recipe, "cpu")
    held_out = build_preference_dataset(recipe, tok, "eval")
    metrics = evaluate_preferences(model, setup_reference(model, recipe), held_out, recipe, "cpu", pad_token_id(tok))
    assert metrics["eval_reward_accuracy"] == 0.0 and metrics["eval_reward_margin"] == 0.0
