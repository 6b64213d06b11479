"""DPO and KTO on 2 CPU processes (gloo) through ``onecard train --num-gpus 2 --cpu``, against one in-process run
with the same global batch (micro-batch 4 x accumulation 2 on one process == 2 x 2 on each of two): the loss curve
to 1e-6 relative, the reward metrics and the trained-token counts, the held-out eval at the end, and the saved
adapter tensor for tensor.

- DPO under FSDP2, continuing from an SFT adapter (the reference is that adapter loaded a second time, switched to
  by ``set_adapter`` on the sharded model), killed right after the step-2 checkpoint and resumed on 2 processes;
- KTO under DDP, continuing from another SFT adapter with the adapter switched off as its reference (so the
  policy starts away from it and the KL point is above 0 at every step: estimated over the global window's
  mismatched pairs split between the ranks); 12 examples and 8 per step, so every other step's window is short and
  its second micro-batch set is empty on both ranks (their stand-in batches weigh 0).
Three launches of ~10-15 s each; helpers from tests/test_distributed_launch.py and the preference tests.
"""

from __future__ import annotations

import json

import pytest
import yaml

from onecard_run_fixtures import make_run
from test_distributed_launch import adapter_weights, json_lines, run_cli
from test_preference_data import dpo_rows, kto_rows, preference_tree, write_jsonl

STEPS = 4
LOSS_RTOL = 1e-6
REWARD_ATOL = 1e-6
METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "reward_desirable",
           "reward_undesirable", "kl")


def tree(tmp_path, model_dir, task, name, micro_batch, **sections):
    rows, held_out = (dpo_rows(12, 1), dpo_rows(6, 2)) if task == "dpo" else (kto_rows(12, 1), kto_rows(6, 2))
    # dropout 0: a dropout mask depends on how examples are split into micro-batches (tests/test_distributed_launch.py)
    return preference_tree(tmp_path, model_dir, task, name=name, rows=rows,
                           data={"eval_path": write_jsonl(tmp_path / f"{task}-held-out.jsonl", held_out)},
                           adapter={"rank": 4, "dropout": 0.0, **sections.pop("adapter", {})},
                           training={"max_steps": STEPS, "micro_batch_size": micro_batch, "grad_accum": 2,
                                     "save_every_steps": 2, "warmup_steps": 1, "learning_rate": 5e-3, "seed": 3,
                                     "optimizer": "adamw_torch", "kernels": "none"}, **sections)


def compare(single_dir, run_dir, summary, single_summary):
    import torch

    ref, got = json_lines(single_dir / "metrics.jsonl"), json_lines(run_dir / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=LOSS_RTOL)
    keys = [k for k in METRICS if k in ref[-1]]
    assert keys and all(k in r for r in got for k in keys)
    for key in keys:  # a reward is beta x the difference of two summed fp32 log-probs (~20 nats): its rounding
        # is absolute, ~beta x 20 x 2**-23 = 2.4e-7, and relative only to the log-probs (observed 1.9e-7)
        assert [r.get(key) for r in got] == pytest.approx([r.get(key) for r in ref], rel=1e-5, abs=REWARD_ATOL), key
    assert [r["trained_tokens"] for r in got] == [r["trained_tokens"] for r in ref]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]
    evals = {k: v for k, v in single_summary.items() if k.startswith(("eval_", "final_"))}
    assert evals and {k: summary[k] for k in evals} == pytest.approx(evals, rel=1e-5, abs=REWARD_ATOL)
    ref_w, got_w = adapter_weights(single_dir), adapter_weights(run_dir)
    assert ref_w.keys() == got_w.keys() and ref_w
    assert not any(".reference." in name for name in got_w)  # the reference adapter was not saved
    for name in ref_w:
        torch.testing.assert_close(got_w[name], ref_w[name], rtol=1e-5, atol=1e-6, msg=name)


def test_dpo_fsdp2_two_processes_match_one_through_kill_and_resume(tmp_path, tiny_llama_dir):
    from onecard.recipe import validate_recipe
    from onecard.train.loop import train
    from onecard.train.spine import CRASH_ENV

    sft = str(make_run(tmp_path / "sft", tiny_llama_dir, method="lora", seed=7))
    sections = {"adapter": {"init_adapter": sft}}
    single = validate_recipe(tree(tmp_path, tiny_llama_dir, "dpo", "single", 4, **sections))
    single_summary = train(single)
    recipe_file = tmp_path / "dpo.yaml"
    recipe_file.write_text(yaml.safe_dump(tree(tmp_path, tiny_llama_dir, "dpo", "multi", 2, **sections)))
    run_dir = tmp_path / "runs" / "multi"
    args = [str(recipe_file), "--num-gpus", "2", "--cpu", "--strategy", "fsdp", "--json"]
    killed = run_cli(args, **{CRASH_ENV: "2"})
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "ranks-step-2").glob("rank-*.pt")) == \
        ["rank-0.pt", "rank-1.pt"]
    done = run_cli([*args, "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["strategy"] == "fsdp" and summary["num_gpus"] == 2 and summary["resumed_from_step"] == 2
    compare(single.run_dir, run_dir, summary, single_summary)


def test_kto_ddp_two_processes_match_one(tmp_path, tiny_llama_dir):
    from onecard.recipe import validate_recipe
    from onecard.train.loop import train

    sft = str(make_run(tmp_path / "sft", tiny_llama_dir, method="lora", seed=8))  # seed 8: KL > 0 at every step
    sections = {"adapter": {"init_adapter": sft}, "preference": {"reference": "adapter-disabled"}}
    single = validate_recipe(tree(tmp_path, tiny_llama_dir, "kto", "single", 4, **sections))
    single_summary = train(single)
    recipe_file = tmp_path / "kto.yaml"
    recipe_file.write_text(yaml.safe_dump(tree(tmp_path, tiny_llama_dir, "kto", "multi", 2, **sections)))
    done = run_cli([str(recipe_file), "--num-gpus", "2", "--cpu", "--strategy", "ddp", "--json"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["strategy"] == "ddp" and summary["loss_type"] == "kto"
    records = json_lines(tmp_path / "runs" / "multi" / "metrics.jsonl")
    assert all(r["kl"] > 0 for r in records)  # the KL point was live, not clamped at 0
    compare(single.run_dir, tmp_path / "runs" / "multi", summary, single_summary)
