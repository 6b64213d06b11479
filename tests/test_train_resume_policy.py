"""--resume leaves a finished run alone and refuses a changed recipe; checkpoints by time and on a signal; the
advice for an unfinished run never goes in a circle; the first step trains; what misleads is said before training.

Through the real CLI entry point in-process (``onecard.cli.main``); the signals are real (``os.kill``).
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import yaml

from _run_helpers import one_line, run_cli, summary, tree_digest, write_chat, write_recipe

os.environ.setdefault("OMP_NUM_THREADS", "1")


def signal_after_step(monkeypatch, step: int, signum: int) -> None:
    """The process sends itself ``signum`` right after optimizer step ``step`` (1-based) has been applied."""
    from onecard.train import spine

    real = spine.optimizer_step

    def stepped(*args, **kwargs):
        record = real(*args, **kwargs)
        if args[2] + 1 == step:  # args[2]: the 0-based step
            os.kill(os.getpid(), signum)
        return record

    monkeypatch.setattr(spine, "optimizer_step", stepped)


def test_resume_leaves_a_finished_run_byte_for_byte(tmp_path, tiny_llama_dir, capsys):
    recipe = write_recipe(tmp_path, tiny_llama_dir, "done", save_every_steps=3)
    assert run_cli(["train", recipe], capsys)[0] == 0
    run_dir = tmp_path / "runs" / "done"
    before = tree_digest(run_dir)
    code, out, err = run_cli(["train", recipe, "--resume", "--json"], capsys)
    assert code == 0, err
    assert "already finished" in one_line(err) and json.loads(out)["steps"] == 6
    assert tree_digest(run_dir) == before
    code, _, err = run_cli(["train", recipe, "--resume", "--set", "training.learning_rate=5e-4"], capsys)
    assert code == 2 and "training.learning_rate" in err and "Traceback" not in err
    assert tree_digest(run_dir) == before
    code, _, err = run_cli(["train", recipe, "--resume", "--allow-recipe-change", "--set",
                            "training.learning_rate=5e-4"], capsys)
    assert code == 2 and "finished" in err  # a finished run stays as it is even with the flag
    assert tree_digest(run_dir) == before


def test_changed_recipe_refused_then_kept_in_history(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_llama_dir, "changed", save_every_minutes=0)
    signal_after_step(monkeypatch, 3, signal.SIGTERM)
    code, _, err = run_cli(["train", recipe], capsys)
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "changed"
    assert code == 128 + signal.SIGTERM, err
    before = tree_digest(run_dir)
    code, _, err = run_cli(["train", recipe, "--resume", "--set", "training.learning_rate=5e-3"], capsys)
    assert code == 2 and "training.learning_rate" in err and "--allow-recipe-change" in one_line(err)
    assert tree_digest(run_dir) == before
    code, _, err = run_cli(["train", recipe, "--resume", "--allow-recipe-change", "--set",
                            "training.learning_rate=5e-3"], capsys)
    assert code == 0, err
    kept = yaml.safe_load((run_dir / "recipe_history" / "recipe-until-step-3.yaml").read_text())
    assert kept["training"]["learning_rate"] == 1e-2
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["training"]["learning_rate"] == 5e-3
    (entry,) = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert entry["resumed_at_step"] == 3
    assert entry["changed"] == {"training.learning_rate": {"before": 1e-2, "after": 5e-3}}
    lrs = [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lrs[2] <= 1e-2 and lrs[3] <= 5e-3 and lrs[3] > 0  # steps 1-3 at the old peak, 4-6 at the new


def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    """Default recipe (no step interval): Ctrl-C still saves, says where, and --resume ends where an
    uninterrupted run ends."""
    from onecard.recipe import Recipe

    assert Recipe.model_fields["training"].default_factory().save_every_steps == 0
    recipe = write_recipe(tmp_path, tiny_llama_dir, "ctrlc")
    signal_after_step(monkeypatch, 4, signal.SIGINT)
    code, _, err = run_cli(["train", recipe], capsys)
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "ctrlc"
    assert code == 128 + signal.SIGINT, err
    assert f"checkpoint saved to {run_dir / 'checkpoints' / 'step-4'}" in one_line(err) and "--resume" in err
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert run_cli(["train", recipe, "--resume"], capsys)[0] == 0
    straight = write_recipe(tmp_path, tiny_llama_dir, "straight")
    assert run_cli(["train", straight], capsys)[0] == 0
    assert summary(run_dir)["final_loss"] == summary(tmp_path / "runs" / "straight")["final_loss"]


def test_save_clock_defaults_to_thirty_minutes(tmp_path, tiny_llama_dir):
    from onecard.recipe import validate_recipe
    from onecard.train.save_policy import SaveClock

    recipe = validate_recipe({"model": {"name_or_path": str(tiny_llama_dir)}})
    now = [0.0]
    clock = SaveClock(recipe, now=lambda: now[0])
    now[0] = 29 * 60.0
    assert not clock.due(7)
    now[0] = 30 * 60.0
    assert clock.due(8)
    clock.saved()
    now[0] += 60.0
    assert not clock.due(9)
    every3 = SaveClock(validate_recipe({"model": {"name_or_path": "x"}, "training": {"save_every_steps": 3,
                                                                                    "save_every_minutes": 0}}))
    assert [s for s in range(1, 10) if every3.due(s)] == [3, 6, 9]


def test_unfinished_run_without_checkpoint_advice_is_not_circular(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    from onecard.train import sft_step

    recipe = write_recipe(tmp_path, tiny_llama_dir, "nockpt", save_every_minutes=0)
    real = sft_step.accumulate_gradients
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(sft_step, "accumulate_gradients", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cli(["train", recipe], capsys)
    monkeypatch.undo()
    code, _, plain = run_cli(["train", recipe], capsys)
    assert code == 2 and "--overwrite" in plain and "--resume" not in plain, plain
    code, _, resumed = run_cli(["train", recipe, "--resume"], capsys)
    assert code == 2 and "--overwrite" in resumed, resumed
    assert run_cli(["train", recipe, "--overwrite"], capsys)[0] == 0


def test_first_step_trains_and_default_accum_is_one(tmp_path, tiny_llama_dir, capsys):
    """Warm-up (1 step here, from warmup_ratio 0.03) no longer gives step 1 a learning rate of 0."""
    from onecard.recipe import validate_recipe

    assert validate_recipe({"model": {"name_or_path": "x"}}).training.grad_accum == 1
    recipe = write_recipe(tmp_path, tiny_llama_dir, "warm", max_steps=3, warmup_ratio=0.03)
    assert run_cli(["train", recipe], capsys)[0] == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "warm" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] > 0


def test_whole_epoch_steps_and_truncated_lines_said_before_training(tmp_path, tiny_llama_dir, capsys):
    data = write_chat(tmp_path / "long.jsonl", long_line=3)
    recipe = write_recipe(tmp_path, tiny_llama_dir, "said", data=data, max_steps=2, grad_accum=8)
    code, _, err = run_cli(["train", recipe], capsys)
    assert code == 0, err
    text = one_line(err)
    assert "one optimizer step takes all 12 examples" in text and "2 steps are 2 epochs" in text
    assert f"1 of 12 examples truncated to data.seq_len: {data}:3" in text
    assert text.index(f"{data}:3") < text.index("train ━")  # before the progress bar, not in the summary
    assert summary(tmp_path / "runs" / "said")["data"]["truncated_at"] == [f"{data}:3"]
