"""FSDP2's low-memory loading (train/fsdp_load.py) on 2 CPU processes (gloo), through ``onecard train --num-gpus 2
--cpu --strategy fsdp``: rank 0 reads the QLoRA base into host memory (quantised one layer at a time), rank 1 builds
the model on meta -- every one of its parameters, counted before the wrap and reported in summary.json -- and the
wrap hands rank 1 its shards of the packed NF4 weights (bf16 storage) with rank 0's QuantStates. The loss curve
equals one in-process QLoRA run with the same global batch to 1e-6 relative, and the adapter tensor for tensor.
(LoRA and DoRA load the same way through accelerate's own path: tests/test_distributed_fsdp.py.) One launch.
"""

from __future__ import annotations

import json

import pytest
import yaml

from test_distributed_fsdp import _compare
from test_distributed_launch import STEPS, recipe_tree, run_cli


def test_qlora_rank_1_builds_on_meta_and_matches_one_process(tmp_path, tiny_llama_dir):
    from onecard.recipe import validate_recipe
    from onecard.train.loop import train

    def tree(name, micro_batch):
        # fp32 compute: bitsandbytes' bf16 matmul on CPU rounds differently at micro-batch 2 and 4 -- one process at
        # 4 x 2 and at 2 x 4 ends with adapters 1.9e-4 apart after 4 steps -- which would hide what this test checks
        return {**recipe_tree(tmp_path, tiny_llama_dir, name, micro_batch), "method": "qlora",
                "quant": {"compute_dtype": "float32"}}

    single = validate_recipe(tree("single", 4))
    assert train(single)["steps"] == STEPS
    recipe_file = tmp_path / "qlora.yaml"
    recipe_file.write_text(yaml.safe_dump(tree("fsdp", 2)))
    done = run_cli([str(recipe_file), "--num-gpus", "2", "--cpu", "--strategy", "fsdp", "--json"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    loading = summary["low_memory_loading"]
    assert loading["on"] and loading["params"] > 0
    assert loading["meta_params_before_wrap_by_rank"] == [0, loading["params"]]  # rank 1: all on meta, rank 0: none
    _compare(single.run_dir, tmp_path / "runs" / "fsdp")
