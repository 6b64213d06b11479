"""Acceptance 3 (resume): a preference run killed after step k and resumed ends with the same weights as an
uninterrupted run (within 1e-6), and its metrics hold each step once.

DPO continues from an SFT adapter (the reference is that adapter, reloaded on resume) with LoRA dropout on and
a shuffled order, killed for real in a subprocess (``os._exit`` right after the step-k checkpoint). KTO is
interrupted in-process the same way (``os._exit`` patched to raise), which also covers its per-window KL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from onecard_run_fixtures import make_run
from test_preference_data import dpo_rows, kto_rows, preference_tree

os.environ.setdefault("OMP_NUM_THREADS", "1")


def tree_for(tmp_path, model_dir, task, name, **sections):
    rows = dpo_rows(12, 4) if task == "dpo" else kto_rows(12, 4)
    return preference_tree(tmp_path, model_dir, task, name=name, rows=rows,
                           training={"max_steps": 7, "micro_batch_size": 2, "grad_accum": 2, "save_every_steps": 2,
                                     "warmup_steps": 1, "learning_rate": 5e-3, "seed": 3},
                           **sections)


def adapter_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_as_straight(run_dir, straight_dir):
    got, want = adapter_weights(run_dir), adapter_weights(straight_dir)
    assert got.keys() == want.keys()
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    assert diff <= 1e-6, f"resumed weights differ by {diff}"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8)), "metrics after resume must have each step exactly once"


def test_dpo_from_sft_adapter_killed_and_resumed(tmp_path, tiny_llama_dir):
    from onecard.recipe import validate_recipe
    from onecard.train.loop import train
    from onecard.train.spine import CRASH_ENV

    sft = str(make_run(tmp_path / "sft", tiny_llama_dir, method="lora", seed=7))
    sections = dict(adapter={"init_adapter": sft, "dropout": 0.3})
    tree = tree_for(tmp_path, tiny_llama_dir, "dpo", "resumed", **sections)
    recipe_file = tmp_path / "resumed.yaml"
    recipe_file.write_text(yaml.safe_dump(tree), encoding="utf-8")
    env = dict(os.environ, **{CRASH_ENV: "4", "OMP_NUM_THREADS": "1"})
    killed = subprocess.run([sys.executable, "-m", "onecard.cli", "train", str(recipe_file)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 17, killed.stderr[-2000:]
    run_dir = tmp_path / "runs" / "resumed"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert not (run_dir / "summary.json").exists()

    summary = train(validate_recipe(tree), resume=True)
    assert summary["steps"] == 7 and summary["resumed_from_step"] == 4
    straight = validate_recipe(tree_for(tmp_path, tiny_llama_dir, "dpo", "straight", **sections))
    train(straight)
    assert_same_as_straight(run_dir, straight.run_dir)


class Killed(BaseException):
    pass


def test_kto_interrupted_and_resumed(tmp_path, tiny_llama_dir, monkeypatch):
    from onecard.recipe import validate_recipe
    from onecard.train.loop import train
    from onecard.train.spine import CRASH_ENV

    tree = tree_for(tmp_path, tiny_llama_dir, "kto", "resumed", adapter={"dropout": 0.3})
    monkeypatch.setenv(CRASH_ENV, "4")

    def die(code):
        raise Killed(code)

    monkeypatch.setattr(os, "_exit", die)
    with pytest.raises(Killed):
        train(validate_recipe(tree))
    monkeypatch.undo()
    os.environ.pop(CRASH_ENV, None)
    summary = train(validate_recipe(tree), resume=True)
    assert summary["resumed_from_step"] == 4
    straight = validate_recipe(tree_for(tmp_path, tiny_llama_dir, "kto", "straight", adapter={"dropout": 0.3}))
    train(straight)
    assert_same_as_straight(tmp_path / "runs" / "resumed", straight.run_dir)
