"""Two "nodes" on this machine: two launches of ``onecard train --nnodes 2 --node-rank 0|1 --num-gpus 1 --cpu`` on
loopback (torchrun's static rendezvous, gloo), against one in-process run with the same global batch.

Node 1 is given another ``output_dir``: global rank 0 alone reads and writes the run directory (the directory may
exist on node 0 only), so node 1's must never appear -- not for metrics, not for its checkpoint rank file, not when
it resumes. Both nodes are killed right after the step-2 checkpoint and resumed; the loss curve equals the
one-process curve to 1e-6 relative (fp32 on CPU; observed ~1e-8), as do the trained adapter weights, and the
2-rank checkpoint is refused on one process. Helpers from tests/test_distributed_launch.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from test_distributed_launch import STEPS, adapter_weights, json_lines, recipe_tree

LOSS_RTOL = 1e-6


def launch_nodes(recipe_file, elsewhere, *extra, **env_extra):
    """Node 0 and node 1 at once; node 1's run directory points ``elsewhere``. Returns both finished processes."""
    from onecard.train.launch import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "ONECARD_LAUNCHED"):
        env.pop(name, None)
    port = str(free_port())
    common = [sys.executable, "-m", "onecard.cli", "train", str(recipe_file), "--num-gpus", "1", "--cpu",
              "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port, *extra]
    procs = [subprocess.Popen([*common, "--node-rank", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True),
             subprocess.Popen([*common, "--node-rank", "1", "--set", f"output_dir={elsewhere}/{{name}}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    outs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def test_two_nodes_match_one_process_and_only_global_rank_0_writes(tmp_path, tiny_llama_dir):
    import torch

    from onecard.errors import UserError
    from onecard.recipe import validate_recipe
    from onecard.train.loop import train
    from onecard.train.spine import CRASH_ENV

    single = validate_recipe(recipe_tree(tmp_path, tiny_llama_dir, "single", micro_batch=4))
    assert train(single)["steps"] == STEPS
    ref_records = json_lines(single.run_dir / "metrics.jsonl")

    recipe_file = tmp_path / "nodes.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_tree(tmp_path, tiny_llama_dir, "nodes", micro_batch=2)))
    run_dir, elsewhere = tmp_path / "runs" / "nodes", tmp_path / "node1"

    killed = launch_nodes(recipe_file, elsewhere, **{CRASH_ENV: "2"})
    assert all(code != 0 for code, _, _ in killed), killed[0][2][-3000:]
    ranks = run_dir / "checkpoints" / "ranks-step-2"
    assert json.loads((ranks / "world.json").read_text()) == {"world_size": 2}
    assert sorted(p.name for p in ranks.glob("rank-*.pt")) == ["rank-0.pt", "rank-1.pt"]  # rank 1's, by rank 0

    with pytest.raises(UserError, match="written by 2 process"):  # another world size: refused, with the fix
        train(validate_recipe(recipe_tree(tmp_path, tiny_llama_dir, "nodes", micro_batch=2)), resume=True)

    resumed = launch_nodes(recipe_file, elsewhere, "--resume", "--json")
    for code, _, err in resumed:
        assert code == 0, err[-3000:]
    summary = json.loads(resumed[0][1])
    assert summary["num_gpus"] == 2 and summary["resumed_from_step"] == 2
    assert resumed[1][1].strip() == ""  # node 1 (global rank 1, its node's local rank 0) printed no result
    assert not elsewhere.exists()  # ... and never touched its run directory

    records = json_lines(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in ref_records], rel=LOSS_RTOL)
    assert [r["trained_tokens"] for r in records] == [r["trained_tokens"] for r in ref_records]
    ref_w, got_w = adapter_weights(single.run_dir), adapter_weights(run_dir)
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        torch.testing.assert_close(got_w[name], ref_w[name], rtol=1e-5, atol=1e-6, msg=name)
