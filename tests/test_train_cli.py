"""Acceptance 4 (training side): bad input gives one short message, exit 2, no traceback, no run directory.

Through the real CLI entry point ``onecard.cli.main`` in-process (the same code the console script runs).
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_recipe(tmp_path, model_dir, **extra):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yes fox"}]}
            for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tree = {"name": "cli", "model": {"name_or_path": str(model_dir)}, "data": {"path": str(data), "seq_len": 64},
            "training": {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "grad_ckpt": False},
            "output_dir": str(tmp_path / "runs" / "{name}")}
    for key, value in extra.items():
        tree[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def run_cli(argv, capsys):
    from onecard.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 4, err
    for needle in needles:
        assert needle in err, err


def test_missing_model_directory(tmp_path, capsys):
    recipe = write_recipe(tmp_path, tmp_path / "no-such-model")
    code, _, err = run_cli(["train", str(recipe)], capsys)
    assert_user_error(code, err, "no-such-model")
    assert not (tmp_path / "runs").exists()


def test_misspelt_recipe_field(tmp_path, tiny_llama_dir, capsys):
    recipe = write_recipe(tmp_path, tiny_llama_dir, trainig={"max_steps": 2})
    code, _, err = run_cli(["train", str(recipe)], capsys)
    assert_user_error(code, err, "trainig", "training")
    assert not (tmp_path / "runs").exists()


def test_negative_learning_rate(tmp_path, tiny_llama_dir, capsys):
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    code, _, err = run_cli(["train", str(recipe), "--set", "training.learning_rate=-1e-4"], capsys)
    assert_user_error(code, err, "training.learning_rate")
    assert not (tmp_path / "runs").exists()


def test_bad_data_leaves_no_run_dir(tmp_path, tiny_llama_dir, capsys):
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    (tmp_path / "chat.jsonl").write_text('{"messages": [}\n', encoding="utf-8")
    code, _, err = run_cli(["train", str(recipe)], capsys)
    assert_user_error(code, err, "chat.jsonl:1")
    assert not (tmp_path / "runs").exists()


def test_finished_run_is_not_overwritten(tmp_path, tiny_llama_dir, capsys):
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    code, out, _ = run_cli(["train", str(recipe), "--json"], capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["steps"] == 2
    adapter = tmp_path / "runs" / "cli" / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    code, _, err = run_cli(["train", str(recipe)], capsys)
    assert_user_error(code, err, "finished run", "--overwrite")
    assert adapter.stat().st_mtime_ns == before
    code, _, _ = run_cli(["train", str(recipe), "--overwrite", "--json"], capsys)
    assert code == 0
    before = adapter.stat().st_mtime_ns
    code, _, err = run_cli(["train", str(recipe), "--resume"], capsys)
    assert code == 0 and "already finished" in err  # --resume leaves a finished run as it is
    assert adapter.stat().st_mtime_ns == before


def test_memory_cap_on_the_cpu_is_refused_before_anything_is_written(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    from onecard.train.memory_cap import MEMORY_CAP_ENV

    monkeypatch.delenv(MEMORY_CAP_ENV, raising=False)
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    code, _, err = run_cli(["train", str(recipe), "--memory-cap-gib", "24"], capsys)
    os.environ.pop(MEMORY_CAP_ENV, None)  # the CLI sets it for the trainer (and N workers) of this process
    assert_user_error(code, err, "--memory-cap-gib", "CPU")
    assert not (tmp_path / "runs").exists()


def test_the_memory_cap_is_the_card_the_streaming_decision_plans_for(monkeypatch, tmp_path, tiny_llama_dir):
    from onecard.recipe import load_recipe
    from onecard.train import stream_setup
    from onecard.train.memory_cap import MEMORY_CAP_ENV

    recipe = load_recipe(write_recipe(tmp_path, tiny_llama_dir, plan={"gpu": "h200"}), [])
    monkeypatch.setattr(stream_setup, "_gpu_id", lambda recipe: "h200")
    assert stream_setup.card_inputs(recipe).gpu.memory_gib > 100
    monkeypatch.setenv(MEMORY_CAP_ENV, "12")
    assert stream_setup.card_inputs(recipe).gpu.memory_gib == 12
    monkeypatch.setenv(MEMORY_CAP_ENV, "500")  # a cap above the card changes nothing
    assert stream_setup.card_inputs(recipe).gpu.memory_gib > 100


def test_training_deterministic_switches_torch_to_deterministic_algorithms(monkeypatch):
    import torch

    from onecard.train.spine import seed_everything

    for name in ("CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC"):
        monkeypatch.delenv(name, raising=False)  # restored after the test: the switch sets them for the process
    try:
        seed_everything(3)
        assert not torch.are_deterministic_algorithms_enabled()
        seed_everything(3, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert "CUDA_LAUNCH_BLOCKING" not in os.environ  # the copy streams keep overlapping compute
        first = torch.rand(3)
        seed_everything(3, deterministic=True)
        assert torch.equal(first, torch.rand(3))
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, False
