"""What the user sees around a run: a CPU run is not held to a GPU's memory, lint errors can be overridden by
name, --set errors name the override, library chatter stays out, and the messages point at options that exist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onecard.cli import app
from onecard.errors import UserError
from onecard.recipe import load_recipe

DEMO_DATA = Path(__file__).resolve().parents[1] / "src" / "onecard" / "assets" / "demo" / "train.jsonl"


def test_cpu_run_not_stopped_by_a_gpu_memory_rule():
    from onecard.train.spine import lint_or_stop

    big = load_recipe(None, ["model.name_or_path=llama-3-8b", "training.micro_batch_size=8", "training.kernels=none"])
    with pytest.raises(UserError) as err:
        lint_or_stop(big, device=None)  # checked against plan.gpu: does not fit the RTX 4090
    assert "does-not-fit" in err.value.what and "--ignore-lint does-not-fit" in err.value.fix
    lint_or_stop(big, device="cpu")  # a CPU run: no GPU memory to fit
    big.lint.ignore = ["does-not-fit"]
    lint_or_stop(big, device=None)


def test_train_on_cpu_with_ignored_lint_error(tmp_path, tiny_llama_dir):
    """seq_len above the tiny model's context (512) is a lint error; --ignore-lint trains anyway. The output
    names the device, says the GPU memory rules were not applied, and carries no transformers chatter."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "model": {"name_or_path": str(tiny_llama_dir)}, "data": {"path": str(DEMO_DATA), "seq_len": 1024},
        "training": {"max_steps": 1, "grad_accum": 1, "micro_batch_size": 2, "kernels": "none"},
        "output_dir": str(tmp_path / "run")}))
    cmd = [sys.executable, "-m", "onecard.cli", "train", str(recipe)]
    stopped = subprocess.run(cmd, capture_output=True, text=True)
    assert stopped.returncode == 2 and "seq-above-context" in stopped.stderr
    assert "--ignore-lint seq-above-context" in stopped.stderr
    ran = subprocess.run(cmd + ["--ignore-lint", "seq-above-context"], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert "memory-not-checked" in ran.stderr and "ignored" in ran.stderr
    assert "FutureWarning" not in ran.stderr and "Loading weights" not in ran.stderr
    assert "│ device" in ran.stdout and "cpu, float32" in ran.stdout


def test_set_errors_name_the_override(tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("model:\n  name_or_path: llama-3-8b\ntraining:\n  learning_rate: 1.0e-4\n")
    result = CliRunner().invoke(app, ["plan", str(recipe), "--set", "training.learning_rate=-1"])
    assert isinstance(result.exception, UserError)
    assert result.exception.where == "--set training.learning_rate=-1"
    with pytest.raises(UserError) as err:  # an error of the file itself still names its line
        load_recipe(recipe, ["training.learning_rate=-1", "training.seed=1"])
    assert err.value.where == "--set training.learning_rate=-1"
    recipe.write_text("model:\n  name_or_path: llama-3-8b\ntraining:\n  learning_rate: -1\n")
    with pytest.raises(UserError) as err:
        load_recipe(recipe, ["training.seed=1"])
    assert err.value.where == f"{recipe}:4"


def test_target_modules_all_linear_and_the_message_for_bad_forms():
    from onecard.plan.inputs import ALL_TARGETS, inputs_from_recipe

    recipe = load_recipe(None, ["model.name_or_path=llama-3-8b", "adapter.target_modules=all-linear"])
    assert inputs_from_recipe(recipe).targets == ALL_TARGETS
    with pytest.raises(UserError) as err:
        load_recipe(None, ["model.name_or_path=llama-3-8b", "adapter.target_modules=5"])
    assert "list of module names" in err.value.what and "all-linear" in err.value.what


def test_target_modules_all_linear_adapts_every_block_linear(tiny_llama_dir):
    from onecard.train.model import load_model_and_tokenizer

    recipe = load_recipe(None, [f"model.name_or_path={tiny_llama_dir}", "adapter.target_modules=all-linear"])
    model, _ = load_model_and_tokenizer(recipe, "cpu")
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"}


def test_eval_of_preference_data_says_why(tmp_path):
    from onecard.eval.harness import eval_recipe

    pairs = tmp_path / "dpo.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    recipe = load_recipe(None, ["model.name_or_path=llama-3-8b", "task=dpo", f"data.path={pairs}"])
    with pytest.raises(UserError) as err:
        eval_recipe(recipe, str(pairs))
    assert "task is" not in err.value.what and "preference" in err.value.what
    assert err.value.where == f"{pairs}:1" and '"messages"' in err.value.fix


def test_plan_probe_without_cuda_names_no_missing_option():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine probes")
    result = CliRunner().invoke(app, ["plan", "--model", "llama-3.2-1b", "--probe"])
    assert isinstance(result.exception, UserError)
    assert "--cpu" not in result.exception.render() and "CUDA" in result.exception.what
