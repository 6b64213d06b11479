"""`onecard demo`: the bundled task, its metric, and one shared demo run.

The demo runs once per test session (the ``demo_run`` fixture in conftest.py, shared with the eval tests);
with ``ONECARD_DEMO_RUN_DIR=DIR`` a finished run there (``demo.json`` present) is reused instead of training again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from onecard.demo import style
from onecard.demo.dataset import HELDOUT_FILE, TRAIN_FILE, build_splits, read_jsonl

# ----------------------------------------------------------------------------- the metric


def test_house_style_answer_scores_100_and_a_plain_answer_0():
    assert style.answer_score(style.format_answer("Your bike ships in 2 days.")) == 100.0
    assert style.answer_score("Your bike ships in 2 days.") == 0.0
    assert style.answer_score("") == 0.0


def test_each_rule_costs_one_point_independently():
    good = style.format_answer("Your bike ships in 2 days.")
    near_greeting = good.replace("Kestrel Bikes!", "Kestrel Bargains!")
    assert style.check_answer(near_greeting) == {"greeting": False, "sign_off": True, "three_lines": True,
                                                 "brief": True}
    no_body = f"{style.GREETING}\n{style.SIGN_OFF}"
    assert style.answer_score(no_body) == 50.0  # greeting + sign-off, but not three lines, so not brief either
    cut_off = f"{style.GREETING}\nYour bike ships in 2 days and then"  # token limit hit: no sign-off, unfinished
    assert style.check_answer(cut_off) == {"greeting": True, "sign_off": False, "three_lines": False,
                                           "brief": False}
    rambling = style.format_answer(" ".join(["word"] * (style.MAX_WORDS + 1)) + ".")
    assert style.check_answer(rambling)["brief"] is False
    assert style.answer_score(good.replace("\n", "\n\n  ")) == 100.0  # blank lines and indentation are ignored


def test_style_score_is_the_mean_of_answer_scores():
    answers = [style.format_answer("Yes, it is covered."), "No.", f"{style.GREETING}\nSure thing."]
    result = style.style_score(answers)
    expected = sum(style.answer_score(a) for a in answers) / len(answers)
    assert result["score"] == pytest.approx(expected)
    assert result["n"] == 3 and result["greeting"] == pytest.approx(200 / 3)
    assert style.style_score([])["score"] == 0.0


# ----------------------------------------------------------------------------- the bundled data


def test_committed_files_are_what_the_generator_writes():
    train, heldout = build_splits()
    assert read_jsonl(TRAIN_FILE) == train, "regenerate with: python -m onecard.demo.dataset"
    assert read_jsonl(HELDOUT_FILE) == heldout, "regenerate with: python -m onecard.demo.dataset"


def test_heldout_questions_are_disjoint_and_enough():
    train, heldout = read_jsonl(TRAIN_FILE), read_jsonl(HELDOUT_FILE)
    assert len(train) >= 100 and len(heldout) >= 20
    train_questions = {r["messages"][0]["content"] for r in train}
    assert not train_questions & {r["messages"][0]["content"] for r in heldout}
    assert len({r["topic"] for r in heldout}) >= 10  # covers most topics, not one
    for record in train + heldout:  # every reference answer is in the house style
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert style.answer_score(record["messages"][1]["content"]) == 100.0


def test_demo_recipe_is_a_valid_train_recipe(tmp_path):
    from onecard.demo.run import demo_recipe
    from onecard.recipe import dump_recipe, load_recipe

    recipe = demo_recipe(tmp_path / "model.gguf", tmp_path / "run", steps=20)
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(recipe))
    again = load_recipe(path)
    assert again == recipe and again.method == "lora" and again.training.max_steps == 20
    assert Path(again.data.path).is_file() and Path(again.data.eval_path).is_file()


def test_demo_refuses_a_directory_that_is_not_a_demo_run(tmp_path):
    from onecard.cli import app
    from typer.testing import CliRunner

    (tmp_path / "precious.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code != 0 and isinstance(result.exception, Exception)
    assert "not a previous demo run" in str(result.exception)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- one shared demo run


def test_demo_json_has_the_before_after_numbers(demo_run):
    run_dir, result = demo_run
    for key in ("model", "data", "metric", "decoding", "base", "tuned", "change", "passed", "training",
                "seconds_measured", "samples"):
        assert key in result, key
    for side in ("base", "tuned"):
        for key in ("heldout_loss", "style_score", "rule_greeting", "rule_sign_off", "rule_three_lines",
                    "rule_brief"):
            assert isinstance(result[side][key], float), (side, key)
    gain = result["tuned"]["style_score"] - result["base"]["style_score"]
    assert result["change"]["style_score"] == pytest.approx(gain)
    assert result["decoding"]["strategy"] == "greedy"
    assert result["training"]["steps"] == 20
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name


def test_base_cannot_do_the_task_and_tuning_teaches_it(demo_run):
    _, result = demo_run
    base, tuned = result["base"], result["tuned"]
    assert result["data"]["heldout_prompts"] >= 20 and base["answers"] == tuned["answers"] >= 20
    assert base["style_score"] < 50
    assert tuned["style_score"] >= base["style_score"] + 30
    assert tuned["heldout_loss"] < base["heldout_loss"]
    assert result["passed"] is True
    # the score in demo.json is the metric applied to the answers stored beside it
    assert style.style_score([s["tuned"] for s in result["samples"]])["score"] == pytest.approx(tuned["style_score"])


def test_adapter_reloads_with_plain_peft_and_speaks_the_house_style(demo_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, result = demo_run
    base_dir = result["model"]["materialized"]
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter)
    model.eval()
    prompt = [{"role": "user", "content": result["samples"][0]["prompt"]}]
    inputs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.startswith("Hello from Kestrel"), answer
    with torch.inference_mode(), model.disable_adapter():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert not tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]).startswith("Hello from Kestrel")
