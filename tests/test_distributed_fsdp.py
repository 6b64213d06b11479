"""FSDP2 on 2 CPU processes (gloo, a CPU device mesh; train/distributed.py ``_fsdp_on_cpu``), end to end through
``onecard train --num-gpus 2 --cpu --strategy fsdp``, against one in-process run with the same global batch:
the loss curve to 1e-6 relative, the trained-token counts exactly, and the saved adapter (gathered from the shards on
rank 0, peft's format) tensor for tensor. Rank 0 alone reads the weights; rank 1 builds on meta and gets its
shards from rank 0 in the wrap (train/fsdp_load.py). LoRA runs through a kill after the step-2 checkpoint and a resume (each
rank's parameter and optimizer shards come back from ``ranks-step-2/``); DoRA, once refused under FSDP1 because
peft read lora_A outside its unit, trains whole under FSDP2's layer units.
"""

from __future__ import annotations

import json

import pytest
import yaml

from test_distributed_launch import STEPS, adapter_weights, json_lines, recipe_tree, run_cli

LOSS_RTOL = 1e-6


def _compare(single_dir, run_dir):
    import torch

    ref, got = json_lines(single_dir / "metrics.jsonl"), json_lines(run_dir / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=LOSS_RTOL)
    assert [r["trained_tokens"] for r in got] == [r["trained_tokens"] for r in ref]
    ref_w, got_w = adapter_weights(single_dir), adapter_weights(run_dir)
    assert ref_w.keys() == got_w.keys() and ref_w
    for name in ref_w:
        assert got_w[name].shape == ref_w[name].shape, name  # whole tensors, not one rank's shard
        torch.testing.assert_close(got_w[name], ref_w[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method,resume", [("lora", True), ("dora", False)])
def test_fsdp2_two_cpu_processes_match_one(tmp_path, tiny_llama_dir, method, resume):
    from onecard.recipe import validate_recipe
    from onecard.train.loop import train
    from onecard.train.spine import CRASH_ENV

    def tree(name, micro_batch):
        return {**recipe_tree(tmp_path, tiny_llama_dir, name, micro_batch), "method": method}

    single = validate_recipe(tree("single", 4))
    assert train(single)["steps"] == STEPS
    recipe_file = tmp_path / "fsdp.yaml"
    recipe_file.write_text(yaml.safe_dump(tree("fsdp", 2)))
    run_dir = tmp_path / "runs" / "fsdp"
    args = [str(recipe_file), "--num-gpus", "2", "--cpu", "--strategy", "fsdp", "--json"]
    if resume:
        killed = run_cli(args, **{CRASH_ENV: "2"})
        assert killed.returncode != 0, killed.stderr[-3000:]
        shards = [__import__("torch").load(run_dir / "checkpoints" / "ranks-step-2" / f"rank-{r}.pt",
                                           weights_only=False)["params"] for r in (0, 1)]
        some = next(iter(shards[0]))
        assert shards[0][some].numel() + shards[1][some].numel() > 0 and shards[0].keys() == shards[1].keys()
        args.append("--resume")
    done = run_cli(args)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["strategy"] == "fsdp" and summary["num_gpus"] == 2
    assert summary.get("resumed_from_step") == (2 if resume else None)
    loading = summary["low_memory_loading"]  # accelerate's cpu_ram_efficient_loading: rank 1 built on meta
    assert loading["on"] and loading["meta_params_before_wrap_by_rank"] == [0, loading["params"]]
    _compare(single.run_dir, run_dir)
