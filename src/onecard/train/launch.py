"""Starting the processes of a ``--num-gpus N`` run, on one node or several, or joining a launcher's job.

No home-made distributed layer: ``onecard train --num-gpus N [--nnodes M --node-rank R --master-addr A]``
re-executes itself under ``torch.distributed.run`` (the launcher ``accelerate launch --multi_gpu`` calls, accelerate
1.16 ``commands/launch.py:multi_gpu_launcher``) with torchrun's static rendezvous: every node runs the same command
with its own ``--node-rank``, and node 0's agent hosts the TCP store at ``A:P`` the others join. torchrun is called
directly rather than through ``accelerate launch`` because ``accelerate launch --cpu`` runs ONE process
(``simple_launcher``; several CPU processes need mpirun), and the CPU tests must go through the same launcher as the
GPUs. ``--num-gpus`` counts the GPUs of one node; the job has ``N x M`` ranks and the workers' recipe says so
(``training.num_gpus``), so the planner and the resume check see the world size.

Under a launcher of its own (``torchrun``, ``accelerate launch``, ``srun``) onecard is already a rank and runs as one
(:func:`external_worker`). srun sets no torchrun variables: :func:`adopt_slurm_env` maps its task ids onto them.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from onecard.errors import UserError
from onecard.train.distributed import CPU_ENV, STRATEGY_ENV

LAUNCHED_ENV = "ONECARD_LAUNCHED"  # "1" in the workers onecard itself started (not an external launcher's)
DEFAULT_MASTER_PORT = 29500        # torchrun's own default: the one every node can be told in advance


@dataclass(frozen=True)
class Nodes:
    """Where this node sits in the job: torchrun's static rendezvous (``--nnodes --node_rank --master_addr
    --master_port``). One node: loopback and a free port, as before."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    def check(self) -> None:
        if self.nnodes < 1:
            raise UserError(f"--nnodes {self.nnodes}: a job has at least one node", where="--nnodes", fix="use 1 or more")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank} is not one of the {self.nnodes} node(s) 0..{self.nnodes - 1}",
                            where="--node-rank", fix=f"give each node its own rank from 0 to {self.nnodes - 1}")
        if self.nnodes > 1 and not self.master_addr:
            raise UserError(f"--nnodes {self.nnodes} without --master-addr: the nodes have nowhere to meet",
                            where="--master-addr",
                            fix="pass node 0's address (hostname or IP reachable from every node) on every node")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise UserError(f"--master-port {self.master_port} is not a TCP port", where="--master-port",
                            fix="use a free port from 1024 to 65535, the same on every node")

    def rendezvous_args(self) -> list[str]:
        addr = self.master_addr or "127.0.0.1"
        port = self.master_port or (free_port() if self.nnodes == 1 else DEFAULT_MASTER_PORT)
        return ["--nnodes", str(self.nnodes), "--node_rank", str(self.node_rank), "--master_addr", addr,
                "--master_port", str(port)]


def per_node_gpus(num_gpus: int | None, recipe_gpus: int, nodes: Nodes) -> int:
    """GPUs on this node: ``--num-gpus``, else the recipe's ``training.num_gpus`` split evenly over the nodes."""
    if num_gpus is not None:
        return num_gpus
    if recipe_gpus % nodes.nnodes:
        raise UserError(f"training.num_gpus {recipe_gpus} does not split evenly over {nodes.nnodes} nodes",
                        where="training.num_gpus", fix="pass --num-gpus with the GPUs of one node")
    return recipe_gpus // nodes.nnodes


# --------------------------------------------------------------------------- onecard's own launch


def check_launchable(recipe, num_gpus: int, cpu: bool) -> None:
    """User errors caught in the parent, before N processes would each print them."""
    check_task_recipe(recipe)
    if recipe.training.optimizer == "adamw_cpu_offload":
        raise UserError("adamw_cpu_offload is a single-GPU optimizer", where="training.optimizer",
                        fix="with several GPUs FSDP shards the optimizer state instead: use adamw_torch_fused")
    if cpu:
        return
    import torch

    have = torch.cuda.device_count()
    if have < num_gpus:
        raise UserError(f"{num_gpus} GPUs asked for, {have} visible", where="--num-gpus",
                        fix=f"use --num-gpus {have}" if have > 1 else "drop --num-gpus (one GPU)")


def check_task_recipe(recipe) -> None:
    """The task's own refusals that need the recipe only (DPO/KTO: the reference policy, KTO's examples per step),
    in the parent and in a rank of an external launcher alike: before N processes load anything."""
    if recipe.task in ("dpo", "kto"):
        from onecard.train.preference import check_preference_recipe

        check_preference_recipe(recipe)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_command(recipe_path: Path, overrides: list[str], num_gpus: int, flags: list[str],
                   nodes: Nodes = Nodes()) -> list[str]:
    """``python -m torch.distributed.run`` with ``num_gpus`` processes on this node running this same
    ``onecard train``; their recipe counts the whole job's ranks."""
    sets = [part for override in overrides for part in ("--set", override)]
    return [sys.executable, "-m", "torch.distributed.run", *nodes.rendezvous_args(), "--nproc_per_node",
            str(num_gpus), "--module", "onecard.cli", "train", str(recipe_path), *sets,
            "--set", f"training.num_gpus={num_gpus * nodes.nnodes}", *flags]


def launch(recipe_path: Path, overrides: list[str], num_gpus: int, flags: list[str], *, strategy: str,
           cpu: bool, nodes: Nodes = Nodes()) -> int:
    """Run this node's share of the job; returns its exit code (the workers print their own errors and results)."""
    import subprocess

    env = launch_env(strategy, cpu)
    return subprocess.run(launch_command(recipe_path, overrides, num_gpus, flags, nodes), env=env).returncode


def launch_env(strategy: str, cpu: bool, base: dict[str, str] | None = None) -> dict[str, str]:
    """The workers' environment: the parent's, plus the strategy, the CPU switch and onecard's source on the path.

    The allocator is left as the user set it. PyTorch's expandable segments were tried against FSDP's
    fragmentation and measured worse: the 70B QLoRA FSDP probe on 2 x H200 reserved 35.55 GiB with
    ``expandable_segments:True`` and 32.96 GiB without, for the same 29.54 GiB allocated peak
    (bench/results/h200x2-multigpu.jsonl)."""
    env = dict(os.environ if base is None else base)
    env[STRATEGY_ENV] = strategy
    env[LAUNCHED_ENV] = "1"
    if cpu:
        env[CPU_ENV] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
    src = str(Path(__file__).resolve().parents[2])  # the workers import the same onecard, installed or not
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def cpu_requested() -> bool:
    """``ONECARD_DISTRIBUTED_CPU=1`` in the environment: the same as ``--cpu``."""
    return os.environ.get(CPU_ENV) == "1"


# --------------------------------------------------------------------------- under someone else's launcher


def adopt_slurm_env(env=None) -> bool:
    """Inside an ``srun`` step of several tasks and no torchrun variables: set RANK, WORLD_SIZE, LOCAL_RANK (and
    MASTER_PORT if unset) from SLURM's task ids, so accelerate's ``env://`` process group finds them. True if it did.

    Written here because neither accelerate 1.16 nor torch maps SLURM's variables (accelerate's
    ``state.py`` reads only the torchrun and MPI names). ``SLURM_STEP_NUM_TASKS`` is the step's count, set by srun;
    ``SLURM_NTASKS`` alone also exists in the batch script, where one process runs and a rank count would hang.
    MASTER_ADDR cannot be derived without ``scontrol``: the batch script exports it (docs/multigpu.md)."""
    env = os.environ if env is None else env
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")) or 1)
    if "WORLD_SIZE" in env or tasks <= 1 or "SLURM_STEP_NUM_TASKS" not in env or "SLURM_PROCID" not in env:
        return False
    if not env.get("MASTER_ADDR"):
        raise UserError("an srun step of several tasks, but MASTER_ADDR is not set", where="environment",
                        fix='export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) '
                            "before srun (docs/multigpu.md has the sbatch script)")
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=str(tasks), LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    env.setdefault("MASTER_PORT", str(DEFAULT_MASTER_PORT))
    return True


def external_worker(env=None) -> bool:
    """A rank started by another launcher (torchrun, accelerate launch, srun after :func:`adopt_slurm_env`)."""
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env and int(env.get("WORLD_SIZE", "1") or 1) > 1 and env.get(LAUNCHED_ENV) != "1"


def join_external(recipe_overrides: list[str], num_gpus: int | None, nodes: Nodes, strategy: str,
                  cpu: bool) -> list[str]:
    """The recipe overrides of a rank started by another launcher: ``training.num_gpus`` is its world size.
    The launch flags belong to the launcher then, and are refused rather than silently ignored."""
    given = [name for name, on in (("--num-gpus", num_gpus is not None), ("--nnodes", nodes.nnodes != 1),
                                   ("--node-rank", nodes.node_rank != 0), ("--master-addr", nodes.master_addr),
                                   ("--master-port", nodes.master_port)) if on]
    if given:
        raise UserError(f"{', '.join(given)} given to one of the {os.environ.get('WORLD_SIZE')} ranks a launcher "
                        "already started", where=given[0],
                        fix="drop the launch flags: the launcher (torchrun, accelerate launch, srun) sets them")
    if strategy != "auto":
        os.environ[STRATEGY_ENV] = strategy
    if cpu:
        os.environ[CPU_ENV] = "1"
    return [*recipe_overrides, f"training.num_gpus={int(os.environ['WORLD_SIZE'])}"]
