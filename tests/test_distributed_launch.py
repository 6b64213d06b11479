"""Issue 9 acceptance 4: the multi-GPU launch path, on 2 CPU processes (gloo), end to end through the real CLI.

``onecard train --num-gpus 2 --cpu`` re-executes itself under torch.distributed.run; each rank trains through an
``accelerate.Accelerator`` (DDP on gloo). The 2-process job is killed right after its step-2 checkpoint (every rank
calls ``os._exit``), then resumed on 2 processes. Checked against one in-process run with the same global batch
(micro-batch 4 x accumulation 2 on one process == micro-batch 2 x accumulation 2 on each of two):
(a) it runs, and only rank 0 writes: one metrics.jsonl with each step once, one summary;
(b) the loss curve equals the one-process curve (fp32 on CPU: to 1e-4 relative, far inside the issue's 1%),
    and so do the trained adapter weights -- which also proves the resume restored weights and optimizer state;
(c) resume works on 2 processes, and is refused on 1 with a clear error.
Two launches of ~10-15 s each on 2 free cores (most of it importing torch/transformers/peft in each rank).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")

STEPS = 4
LOSS_RTOL = 1e-4


def write_chat(path, n=16):
    rows = []
    for i in range(n):
        answer = "yes " * (1 + i % 5) + "the quick brown fox" + " no" * (i % 3)
        rows.append({"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe_tree(tmp_path, model_dir, name, micro_batch):
    # dropout 0: a dropout mask depends on how examples are split into micro-batches, so the curves of
    # different splits would differ by design; resume of RNG state is covered by tests/test_train_resume.py.
    return {
        "name": name, "model": {"name_or_path": str(model_dir)}, "method": "lora",
        "adapter": {"rank": 4, "dropout": 0.0},
        "data": {"path": str(write_chat(tmp_path / "chat.jsonl")), "seq_len": 64},
        "training": {"max_steps": STEPS, "micro_batch_size": micro_batch, "grad_accum": 2, "learning_rate": 1e-2,
                     "warmup_steps": 1, "save_every_steps": 2, "optimizer": "adamw_torch", "seed": 5,
                     "grad_ckpt": True, "kernels": "none"},
        "output_dir": str(tmp_path / "runs" / "{name}"),
    }


def run_cli(args, **env_extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    return subprocess.run([sys.executable, "-m", "onecard.cli", "train", *args], env=env, capture_output=True,
                          text=True, timeout=240)


def adapter_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_two_cpu_processes_match_one_and_resume(tmp_path, tiny_llama_dir):
    import torch

    from onecard.errors import UserError
    from onecard.recipe import validate_recipe
    from onecard.train.loop import train
    from onecard.train.spine import CRASH_ENV

    single = validate_recipe(recipe_tree(tmp_path, tiny_llama_dir, "single", micro_batch=4))
    assert train(single)["steps"] == STEPS
    ref_records = json_lines(single.run_dir / "metrics.jsonl")
    ref_losses = [r["loss"] for r in ref_records]

    recipe_file = tmp_path / "multi.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_tree(tmp_path, tiny_llama_dir, "multi", micro_batch=2)))
    run_dir = tmp_path / "runs" / "multi"

    killed = run_cli([str(recipe_file), "--num-gpus", "2", "--cpu"], **{CRASH_ENV: "2"})
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step-2" / "state.json").is_file(), killed.stderr[-3000:]
    world = json.loads((run_dir / "checkpoints" / "ranks-step-2" / "world.json").read_text())
    assert world == {"world_size": 2}
    assert sorted(p.name for p in (run_dir / "checkpoints" / "ranks-step-2").glob("rank-*.pt")) == \
        ["rank-0.pt", "rank-1.pt"]
    assert not (run_dir / "summary.json").exists()

    # (c) a 2-process checkpoint is refused on 1 process, before anything is loaded
    with pytest.raises(UserError, match="written by 2 process"):
        train(validate_recipe(recipe_tree(tmp_path, tiny_llama_dir, "multi", micro_batch=2)), resume=True)

    resumed = run_cli([str(recipe_file), "--num-gpus", "2", "--cpu", "--resume", "--json"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)  # exactly one JSON document: rank 1 printed nothing
    assert summary["num_gpus"] == 2 and summary["strategy"] == "ddp" and summary["resumed_from_step"] == 2

    # (a) rank 0 alone wrote metrics: one file, each step once, and one TensorBoard writer per launch
    assert [p.name for p in run_dir.rglob("metrics*.jsonl")] == ["metrics.jsonl"]
    records = json_lines(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 2  # the killed launch and the resume

    # (b) the same loss curve and the same trained adapter as one process with the same global batch
    losses = [r["loss"] for r in records]
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL)
    assert [r["trained_tokens"] for r in records] == [r["trained_tokens"] for r in ref_records]
    assert [r["tokens"] for r in records] == [r["tokens"] for r in ref_records]
    assert losses[-1] < losses[0]  # it trained
    ref_w, got_w = adapter_weights(single.run_dir), adapter_weights(run_dir)
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        torch.testing.assert_close(got_w[name], ref_w[name], rtol=1e-4, atol=1e-5, msg=name)


def json_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
