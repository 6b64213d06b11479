"""Several nodes, and runs started by someone else's launcher: the pure parts (flags, torchrun's arguments, SLURM's
variables, the refusals). No process group: well under a second. The two-node run itself is
tests/test_distributed_nodes.py."""

from __future__ import annotations

import json

import pytest

from onecard.errors import UserError
from onecard.train.launch import (DEFAULT_MASTER_PORT, LAUNCHED_ENV, Nodes, adopt_slurm_env, external_worker,
                                  launch_command, launch_env, per_node_gpus)


def _after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_launch_command_passes_the_static_rendezvous_and_counts_every_node(tmp_path):
    nodes = Nodes(nnodes=2, node_rank=1, master_addr="10.0.0.7", master_port=29555)
    cmd = launch_command(tmp_path / "r.yaml", [], 4, ["--resume"], nodes)
    assert [_after(cmd, f) for f in ("--nnodes", "--node_rank", "--master_addr", "--master_port",
                                     "--nproc_per_node")] == ["2", "1", "10.0.0.7", "29555", "4"]
    assert "training.num_gpus=8" in cmd  # the workers' recipe: 4 GPUs x 2 nodes = 8 ranks
    assert "--rdzv_backend" not in cmd and "--standalone" not in cmd  # torchrun's default: static rendezvous
    default_port = launch_command(tmp_path / "r.yaml", [], 1, [], Nodes(2, 0, "n0"))
    assert _after(default_port, "--master_port") == str(DEFAULT_MASTER_PORT)  # the same on every node
    one = launch_command(tmp_path / "r.yaml", [], 2, [])
    assert _after(one, "--nnodes") == "1" and _after(one, "--master_addr") == "127.0.0.1"


@pytest.mark.parametrize("nodes,where,what", [
    (Nodes(2, 2, "n0"), "--node-rank", "not one of the 2 node"),
    (Nodes(1, 1), "--node-rank", "not one of the 1 node"),
    (Nodes(2, -1, "n0"), "--node-rank", "not one of"),
    (Nodes(2, 1), "--master-addr", "nowhere to meet"),
    (Nodes(0, 0), "--nnodes", "at least one node"),
    (Nodes(2, 0, "n0", 70000), "--master-port", "not a TCP port"),
])
def test_bad_node_combinations_are_user_errors(nodes, where, what):
    with pytest.raises(UserError, match=what) as exc:
        nodes.check()
    assert exc.value.where == where and exc.value.fix


def test_per_node_gpus_from_the_flag_or_an_even_split_of_the_recipe():
    assert per_node_gpus(3, 8, Nodes(2, 0, "n0")) == 3
    assert per_node_gpus(None, 8, Nodes(2, 0, "n0")) == 4
    with pytest.raises(UserError, match="does not split evenly"):
        per_node_gpus(None, 3, Nodes(2, 0, "n0"))


def test_cli_refuses_bad_node_flags_with_exit_2_before_anything(tmp_path, capsys):
    from onecard.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"model": {"name_or_path": str(tmp_path)}, "output_dir": str(tmp_path / "run")}))
    for args, text in ((["--nnodes", "2", "--node-rank", "2", "--master-addr", "x"], "--node-rank 2"),
                       (["--nnodes", "2", "--node-rank", "1"], "without --master-addr")):
        with pytest.raises(SystemExit) as exc:
            main(["train", str(path), "--num-gpus", "1", "--cpu", *args])
        assert exc.value.code == 2
        assert text in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_srun_tasks_become_torchrun_ranks():
    env = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "MASTER_ADDR": "node0"}
    assert adopt_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("5", "8", "1", "29500")
    assert external_worker(env)
    mine = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "MASTER_ADDR": "n", "MASTER_PORT": "1234"}
    adopt_slurm_env(mine)
    assert mine["MASTER_PORT"] == "1234"  # the user's port is kept


def test_slurm_env_is_left_alone_unless_srun_started_several_tasks():
    batch_script = {"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}  # sbatch's own shell: one process, no step
    assert not adopt_slurm_env(batch_script) and "WORLD_SIZE" not in batch_script
    one_task = {"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}
    assert not adopt_slurm_env(one_task)
    under_torchrun = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "WORLD_SIZE": "4", "RANK": "3"}
    assert not adopt_slurm_env(under_torchrun) and under_torchrun["RANK"] == "3"  # torchrun's ids win
    with pytest.raises(UserError, match="MASTER_ADDR is not set") as exc:
        adopt_slurm_env({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"})
    assert "scontrol show hostnames" in exc.value.fix


def test_external_worker_is_a_rank_onecard_did_not_start():
    assert external_worker({"LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert not external_worker({"LOCAL_RANK": "0", "WORLD_SIZE": "2", LAUNCHED_ENV: "1"})  # onecard's own
    assert not external_worker({"LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    assert not external_worker({})
    assert launch_env("ddp", cpu=True, base={})[LAUNCHED_ENV] == "1"


def test_launch_flags_given_to_an_external_rank_are_refused(monkeypatch):
    from onecard.train.distributed import STRATEGY_ENV
    from onecard.train.launch import join_external

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv(STRATEGY_ENV, raising=False)
    assert join_external(["a=1"], None, Nodes(), "fsdp", False) == ["a=1", "training.num_gpus=4"]
    import os

    assert os.environ[STRATEGY_ENV] == "fsdp"
    with pytest.raises(UserError, match="--num-gpus, --nnodes, --master-addr given to one of the 4 ranks"):
        join_external([], 2, Nodes(2, 0, "x"), "auto", False)


def test_a_preference_recipe_error_stops_a_rank_of_an_external_launcher_before_loading(monkeypatch):
    """A rank started by torchrun has had no parent to check the recipe: the task's refusals run in it."""
    from onecard.recipe import validate_recipe
    from onecard.train.loop import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match="'adapter-disabled' needs an adapter method") as exc:
        train(validate_recipe({"model": {"name_or_path": "x"}, "task": "dpo", "method": "full",
                               "preference": {"reference": "adapter-disabled"}, "training": {"num_gpus": 2}}))
    assert exc.value.fix