"""Faults a night-long run survives: NaN/inf and gradient blow-up, CUDA out-of-memory, a full disk during a
checkpoint, SIGTERM during a save. Each ends with one message, exit code and a run directory ``--resume`` continues.

The OOM and the full disk are injected (torch.cuda.OutOfMemoryError from the step, OSError(ENOSPC) from the
checkpoint writer); the SIGTERM is a real signal to a real ``onecard train`` process.
"""

from __future__ import annotations

import errno
import math
import os
import signal

import pytest
import yaml

from _run_helpers import one_line, run_cli, run_process, summary, write_recipe

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def straight_final_loss(tmp_path_factory, tiny_model_factory):
    """Final loss of the uninterrupted run every resumed run here must end at."""
    from onecard.recipe import load_recipe
    from onecard.train.loop import train

    tmp = tmp_path_factory.mktemp("straight")
    return train(load_recipe(write_recipe(tmp, tiny_model_factory("llama"), "straight")))["final_loss"]


def faulty_accumulate(monkeypatch, at_call: int, fault):
    """``sft_step.accumulate_gradients`` with ``fault(loss, n, model)`` applied at its ``at_call``-th call (1-based)."""
    from onecard.train import sft_step

    real, calls = sft_step.accumulate_gradients, []

    def accumulate(model, *args, **kwargs):
        calls.append(1)
        loss, n = real(model, *args, **kwargs)
        return fault(loss, n, model) if len(calls) == at_call else (loss, n)

    monkeypatch.setattr(sft_step, "accumulate_gradients", accumulate)


def latest(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def checkpoint_steps(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name != "latest")


def test_nan_loss_stops_at_that_step_without_saving_it(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path, tiny_llama_dir, "nan", save_every_steps=1)
    faulty_accumulate(monkeypatch, 5, lambda loss, n, model: (float("nan"), n))
    code, _, err = run_cli(["train", recipe], capsys)
    run_dir = tmp_path / "runs" / "nan"
    text = one_line(err)
    assert code == 2 and "Traceback" not in err
    assert "training stopped at step 5: the loss is nan" in text and "step-4" in text
    assert latest(run_dir) == "step-4" and checkpoint_steps(run_dir) == ["step-3", "step-4"]
    weights = load_file(str(run_dir / "checkpoints" / "step-4" / "trainable.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())
    assert not (run_dir / "summary.json").exists() and not (run_dir / "adapter").exists()


def test_gradient_blowup_stops_the_run(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    def blow_up(loss, n, model):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(1e6)
        return loss, n

    recipe = write_recipe(tmp_path, tiny_llama_dir, "blowup", save_every_steps=3, max_grad_norm=None)
    faulty_accumulate(monkeypatch, 6, blow_up)
    code, _, err = run_cli(["train", recipe], capsys)
    text = one_line(err)
    assert code == 2 and "training stopped at step 6: the gradient norm blew up" in text, err
    assert latest(tmp_path / "runs" / "blowup") == "step-3"
    monkeypatch.undo()
    assert run_cli(["train", recipe, "--resume"], capsys)[0] == 0  # the kept checkpoint resumes


def test_out_of_memory_mid_run_names_step_plan_and_fix(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    import torch

    def oom(loss, n, model):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    recipe = write_recipe(tmp_path, tiny_llama_dir, "oom", save_every_steps=2, micro_batch_size=4)
    faulty_accumulate(monkeypatch, 3, oom)
    code, _, err = run_cli(["train", recipe], capsys)
    text = one_line(err)
    assert code == 2 and "Traceback" not in err, err
    assert "out of memory at step 3" in text and "Tried to allocate 20.00 GiB" in text
    assert "GiB on rtx4090 (estimated)" in text and "measured peak" in text
    assert "micro-batch 3" in text and "--set training.micro_batch_size=3" in text  # the plan's cheapest change
    assert f"The last checkpoint, {tmp_path / 'runs' / 'oom' / 'checkpoints' / 'step-2'}, is kept" in text
    assert latest(tmp_path / "runs" / "oom") == "step-2"


@pytest.mark.parametrize("save_fits", [True, False], ids=["saved", "card-too-full-to-save"])
def test_out_of_memory_in_the_eval_between_steps_is_the_same_clean_stop(tmp_path, tiny_llama_dir, capsys,
                                                                        monkeypatch, save_fits):
    """The held-out eval runs in batches of the training micro-batch; if it still runs out of memory, the run
    stops with the same message as a step's OOM, naming the eval. The step before the eval was applied, so it is
    checkpointed (step 6, between the saves of steps 4 and 8) and --resume goes on from it; if that save runs out of
    memory too, the stop is the same, with step 4's checkpoint."""
    import torch

    from onecard.eval import harness
    from onecard.train import checkpoint

    real_save = checkpoint.save_checkpoint

    def save_checkpoint(run_dir, model, optimizer, state, *args, **kwargs):
        if not save_fits and state.global_step == 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return real_save(run_dir, model, optimizer, state, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_checkpoint)

    real, batch_sizes = harness.heldout_loss, []

    def heldout_loss(model, examples, pad_id, batch_size=8, progress=None):
        batch_sizes.append(batch_size)
        if len(batch_sizes) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.28 GiB")
        return real(model, examples, pad_id, batch_size, progress)

    recipe = write_recipe(tmp_path, tiny_llama_dir, "evaloom", save_every_steps=4, micro_batch_size=3,
                          max_steps=8)
    tree = yaml.safe_load(recipe.read_text())
    tree["data"]["eval_path"] = tree["data"]["path"]
    tree["eval"] = {"every_steps": 3}
    recipe.write_text(yaml.safe_dump(tree))
    monkeypatch.setattr(harness, "heldout_loss", heldout_loss)
    code, _, err = run_cli(["train", recipe], capsys)
    text = one_line(err)
    run_dir = tmp_path / "runs" / "evaloom"
    assert code == 2 and "Traceback" not in err, err
    assert "out of memory in the eval after step 6" in text and "Tried to allocate 9.28 GiB" in text
    kept = "step-6" if save_fits else "step-4"
    assert f"The last checkpoint, {run_dir / 'checkpoints' / kept}, is kept" in text
    assert batch_sizes == [3, 3] and latest(run_dir) == kept
    code, _, err = run_cli(["train", recipe, "--resume"], capsys)
    assert code == 0, err
    assert summary(run_dir)["resumed_from_step"] == int(kept[5:]) and latest(run_dir) == "step-8"


def test_disk_full_during_checkpoint_keeps_previous_and_resumes(tmp_path, tiny_llama_dir, capsys, monkeypatch,
                                                                 straight_final_loss):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def filling(tensors, filename, *args, **kwargs):
        calls.append(1)
        real(tensors, filename, *args, **kwargs)  # a partial checkpoint is on disk when the disk fills
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    recipe = write_recipe(tmp_path, tiny_llama_dir, "diskfull", save_every_steps=2)
    monkeypatch.setattr(safetensors.torch, "save_file", filling)
    code, _, err = run_cli(["train", recipe], capsys)
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "diskfull"
    text = one_line(err)
    assert code == 2 and "Traceback" not in err, err
    assert "disk filled up while writing the checkpoint of step 4" in text and "step-2 is intact" in text
    assert checkpoint_steps(run_dir) == ["step-2"] and latest(run_dir) == "step-2"  # no half-written copy left
    code, _, err = run_cli(["train", recipe, "--resume"], capsys)
    assert code == 0, err
    assert summary(run_dir)["final_loss"] == straight_final_loss


SIGTERM_IN_SAVE = """
import os, signal
import safetensors.torch as st
real, calls = st.save_file, []
def save_file(*args, **kwargs):
    calls.append(1)
    real(*args, **kwargs)
    if len(calls) == 2:  # the checkpoint of step 4, half-written: weights on disk, optimizer and state not yet
        os.kill(os.getpid(), signal.SIGTERM)
st.save_file = save_file
"""

SIGTERM_MID_RUN = """
import os, signal
from onecard.train import spine
real = spine.optimizer_step
def optimizer_step(*args, **kwargs):
    record = real(*args, **kwargs)
    if args[2] == 2:  # during step 3 (args[2]: the 0-based step)
        os.kill(os.getpid(), signal.SIGTERM)
    return record
spine.optimizer_step = optimizer_step
"""


@pytest.mark.parametrize("where", ["in-save", "mid-run"])
def test_sigterm_leaves_a_resumable_run(tmp_path, tiny_llama_dir, capsys, straight_final_loss, where):
    """``onecard train`` as a process gets SIGTERM; the save finishes (or one is made), and --resume ends at the
    uninterrupted run's final loss."""
    prelude, kept = {"in-save": (SIGTERM_IN_SAVE, "step-4"), "mid-run": (SIGTERM_MID_RUN, "step-3")}[where]
    extra = {"save_every_steps": 2} if where == "in-save" else {}  # mid-run: the default recipe, time-based only
    recipe = write_recipe(tmp_path, tiny_llama_dir, f"term-{where}", **extra)
    killed = run_process(["train", recipe], prelude)
    run_dir = tmp_path / "runs" / f"term-{where}"
    assert killed.returncode == 128 + signal.SIGTERM, killed.stderr[-3000:]
    assert f"checkpoint saved to {run_dir / 'checkpoints' / kept}" in one_line(killed.stderr)
    assert latest(run_dir) == kept and not list((run_dir / "checkpoints").glob(".tmp-*"))
    code, _, err = run_cli(["train", recipe, "--resume"], capsys)
    assert code == 0, err
    assert summary(run_dir)["resumed_from_step"] == int(kept.split("-")[1])
    assert math.isclose(summary(run_dir)["final_loss"], straight_final_loss, rel_tol=0, abs_tol=0)
