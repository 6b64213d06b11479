"""Acceptance 3: a run killed after step k and resumed ends with the same weights as an uninterrupted run.

The kill is real: ``onecard train`` runs in a subprocess that calls ``os._exit`` right after writing the
checkpoint of step k (ONECARD_TEST_CRASH_AT_STEP), so nothing is flushed or cleaned up. LoRA dropout is
on, so the resumed run only matches if every RNG state was restored; the data order is shuffled, so it
only matches if the position inside the epoch was restored too (k falls mid-epoch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_chat(path, n=12):
    rows = []
    for i in range(n):
        answer = "yes " * (1 + i % 5) + "the quick brown fox"
        rows.append({"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe_tree(tmp_path, model_dir, name, method="lora"):
    return {
        "name": name, "model": {"name_or_path": str(model_dir)}, "method": method,
        "adapter": {"rank": 4, "dropout": 0.3},
        "data": {"path": str(write_chat(tmp_path / "chat.jsonl")), "seq_len": 64},
        "training": {"max_steps": 8, "micro_batch_size": 2, "grad_accum": 2, "learning_rate": 1e-2,
                     "warmup_steps": 2, "save_every_steps": 3, "optimizer": "adamw_torch_fused", "seed": 5,
                     "grad_ckpt": True},
        "output_dir": str(tmp_path / "runs" / "{name}"),
    }


def load_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, tiny_llama_dir):
    from onecard.recipe import validate_recipe
    from onecard.train.loop import train
    from onecard.train.spine import CRASH_ENV

    tree = recipe_tree(tmp_path, tiny_llama_dir, "resumed")
    recipe_file = tmp_path / "resumed.yaml"
    recipe_file.write_text(yaml.safe_dump(tree), encoding="utf-8")
    env = dict(os.environ, **{CRASH_ENV: "6", "OMP_NUM_THREADS": "1"})
    killed = subprocess.run([sys.executable, "-m", "onecard.cli", "train", str(recipe_file)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 17, killed.stderr[-2000:]
    run_dir = tmp_path / "runs" / "resumed"
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-6"

    resumed = validate_recipe(tree)
    with pytest.raises(Exception, match="unfinished run"):
        train(resumed)  # without --resume the unfinished run is not clobbered
    summary = train(resumed, resume=True)
    assert summary["steps"] == 8 and summary["resumed_from_step"] == 6

    reference = validate_recipe(recipe_tree(tmp_path, tiny_llama_dir, "straight"))
    train(reference)
    got, want = load_weights(run_dir), load_weights(reference.run_dir)
    assert got.keys() == want.keys()
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    assert diff <= 1e-6, f"resumed weights differ by {diff}"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9)), "metrics after resume must have each step exactly once"


def test_resume_without_rng_restore_differs(tmp_path, tiny_llama_dir, monkeypatch):
    """Control: with RNG restore disabled the resumed run diverges, so the test above can fail."""
    from onecard.recipe import validate_recipe
    from onecard.train import checkpoint, loop, spine

    tree = recipe_tree(tmp_path, tiny_llama_dir, "norng")
    tree["training"]["max_steps"] = 6
    recipe = validate_recipe(tree)
    loop.train(recipe)
    straight = load_weights(recipe.run_dir)
    # Resume from the step-3 checkpoint, once with RNG restore switched off.
    (recipe.run_dir / "checkpoints" / "latest").write_text("step-3\n")
    (recipe.run_dir / "summary.json").unlink()  # unfinished again: --resume leaves a finished run alone
    monkeypatch.setattr(spine, "restore", _restore_without_rng(checkpoint))
    loop.train(recipe, resume=True)
    diff = max((load_weights(recipe.run_dir)[k] - straight[k]).abs().max().item() for k in straight)
    assert diff > 1e-6


def _restore_without_rng(checkpoint):
    def restore(run_dir, model, optimizer):
        ckpt = checkpoint.load_latest(run_dir)
        checkpoint.load_trainable(model, ckpt["trainable"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return ckpt["state"]

    return restore


def test_crash_while_saving_leaves_previous_checkpoint(tmp_path, monkeypatch):
    import torch

    from onecard.train import checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save_checkpoint(tmp_path, model, opt, checkpoint.TrainState(global_step=1), {"step": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)

    def dying_save(*args, **kwargs):
        raise OSError("disk full")  # dies half-way: after the weights, before the state file

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(tmp_path, model, opt, checkpoint.TrainState(global_step=2), {"step": 2})
    monkeypatch.undo()
    latest = checkpoint.load_latest(tmp_path)
    assert latest["state"].global_step == 1
    assert torch.equal(latest["trainable"]["weight"], before["weight"])
    # A stale pointer (names a step that never completed) falls back to the newest complete checkpoint.
    (tmp_path / "checkpoints" / "latest").write_text("step-2\n")
    assert checkpoint.load_latest(tmp_path)["state"].global_step == 1
