"""`onecard train RECIPE`: validate, load, train, save (the same path `onecard demo` takes)."""

from __future__ import annotations

from pathlib import Path

import typer

from onecard.commands.common import JsonOption, SetOption, print_json, quiet_transformers


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML file."),
        overrides: list[str] = SetOption,
        resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's latest checkpoint."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing run directory and start over."),
        allow_recipe_change: bool = typer.Option(False, "--allow-recipe-change",
                                                 help="With --resume: continue under a recipe that differs from the "
                                                      "run's recipe.yaml (the old one is kept in recipe_history/)."),
        as_json: bool = JsonOption,
        num_gpus: int = typer.Option(None, "--num-gpus", min=1,
                                     help="GPUs to train on (default: training.num_gpus). N > 1 starts N processes "
                                          "(torch.distributed.run) that train through accelerate, same global batch."),
        strategy: str = typer.Option("auto", "--strategy", help="With N > 1: ddp (replicate), fsdp (shard, FSDP2) "
                                     "or auto = ddp when the plan fits one card, fsdp otherwise and for method full."),
        cpu: bool = typer.Option(False, "--cpu", help="With N > 1: N CPU processes on the gloo backend (tests, CI)."),
        nnodes: int = typer.Option(1, "--nnodes", help="Nodes in the job; run the same command on each, with its "
                                   "--node-rank (torchrun's static rendezvous). --num-gpus counts one node's GPUs."),
        node_rank: int = typer.Option(0, "--node-rank", help="With --nnodes M: this node's rank, 0..M-1."),
        master_addr: str = typer.Option(None, "--master-addr", help="With --nnodes M > 1: node 0's address."),
        master_port: int = typer.Option(None, "--master-port", help="With --nnodes: node 0's port, the same on "
                                        "every node (default 29500; one node: a free port)."),
        ignore_lint: list[str] = typer.Option(None, "--ignore-lint", metavar="RULE",
                                              help="Train despite this lint error (repeatable; adds to lint.ignore)."),
        memory_cap_gib: float = typer.Option(None, "--memory-cap-gib", min=1,
                                             help="Emulate a card of this size on a larger one (planned for, and "
                                                  "enforced on the allocator): check a 24 GB recipe on an H100."),
    ) -> None:
        """Fine-tune (LoRA, QLoRA, DoRA or full) or continue pre-training as the recipe says."""
        from rich.console import Console

        from onecard.recipe import load_recipe
        from onecard.train import launch
        from onecard.train.distributed import is_worker

        nodes = launch.Nodes(nnodes, node_rank, master_addr, master_port)
        nodes.check()
        launch.adopt_slurm_env()
        external = launch.external_worker()

        if memory_cap_gib is not None:
            import os

            from onecard.train.memory_cap import MEMORY_CAP_ENV

            os.environ[MEMORY_CAP_ENV] = f"{memory_cap_gib:g}"  # read by the trainer (and by N worker processes)
        if external:  # a rank of torchrun / accelerate launch / srun: it runs, it launches nothing
            overrides = launch.join_external(overrides or [], num_gpus, nodes, strategy, cpu)
        elif num_gpus is not None or nodes.nnodes > 1:
            recipe_gpus = load_recipe(recipe_path, overrides or []).training.num_gpus
            per_node = launch.per_node_gpus(num_gpus, recipe_gpus, nodes)
            overrides = [*(overrides or []), f"training.num_gpus={per_node * nodes.nnodes}"]
        recipe = load_recipe(recipe_path, overrides or [])
        if ignore_lint:
            recipe.lint.ignore = [*recipe.lint.ignore, *ignore_lint]
            overrides = [*(overrides or []), f"lint.ignore=[{','.join(recipe.lint.ignore)}]"]  # for N processes
        if recipe.training.num_gpus > 1 and not is_worker():
            flags = [f for f, on in (("--resume", resume), ("--overwrite", overwrite), ("--json", as_json),
                                     ("--allow-recipe-change", allow_recipe_change)) if on]
            code = _launch(recipe, recipe_path, overrides or [], strategy, cpu, flags, nodes)
            if code:
                raise SystemExit(code)  # not typer.Exit: cli.main's standalone_mode=False would swallow the code
            return
        console = Console(stderr=True, highlight=False)
        quiet_transformers()
        from onecard.train.loop import train as run_training

        summary = run_training(recipe, resume=resume, console=console, overwrite=overwrite,
                               allow_recipe_change=allow_recipe_change)
        if summary is None:  # a rank other than 0 of a multi-GPU run: rank 0 reports
            return
        if summary.get("already_finished"):
            console.print(f"the run in {recipe.run_dir} is already finished ({summary.get('steps')} steps): "
                          "left as it is, nothing to resume")
        if as_json:
            print_json(summary)
            return
        _print_summary(Console(highlight=False), summary)


def _launch(recipe, recipe_path: Path, overrides: list[str], strategy: str, cpu: bool, flags: list[str],
            nodes) -> int:
    """Check what the parent can check (one clean message instead of N), then run this node's processes.
    The run directory is global rank 0's: with several nodes only that rank reads and writes it."""
    from onecard.train import distributed, launch
    from onecard.train.checkpoint import check_resume_world
    from onecard.train.rundir import check_run_dir
    from onecard.train.spine import lint_or_stop
    from onecard.train.resume_policy import check_resume

    world = recipe.training.num_gpus
    per_node = world // nodes.nnodes
    single_node = nodes.nnodes == 1  # several nodes: the workers' rank 0 checks, and every node's workers stop alike
    if single_node and check_resume(recipe, "--resume" in flags, "--allow-recipe-change" in flags) is not None:
        print(f"the run in {recipe.run_dir} is already finished: left as it is, nothing to resume")
        return 0
    if single_node:
        check_run_dir(recipe.run_dir, "--resume" in flags, "--overwrite" in flags)
    cpu = cpu or launch.cpu_requested()
    # the machine and the launch flags first: they make every answer about the recipe moot
    launch.check_launchable(recipe, per_node, cpu)
    chosen = distributed.choose_strategy(recipe, "ddp" if cpu and strategy == "auto" else strategy)
    distributed.check_strategy(recipe, chosen)
    lint_or_stop(recipe, device="cpu" if cpu else None)
    if "--resume" in flags and single_node:
        check_resume_world(recipe.run_dir, world)
    return launch.launch(recipe_path, overrides, per_node, flags, strategy=chosen, cpu=cpu, nodes=nodes)


def device_text(summary: dict) -> str:
    """``cuda:0 (NVIDIA H200), bfloat16`` / ``cpu, float32``: what the run's numbers were measured on."""
    device = str(summary.get("device", "-"))
    name = ""
    if device.startswith("cuda"):
        import torch

        name = f" ({torch.cuda.get_device_name(torch.device(device).index or 0)})"
    return f"{device}{name}, {summary.get('dtype', '-')}"


def _print_summary(console, summary: dict) -> None:
    from rich.table import Table

    table = Table(title="onecard train (measured)", show_header=False)
    rows = [
        ("output", summary["output"]),
        ("device", device_text(summary)),
        ("steps", str(summary["steps"])),
        ("loss first -> final", f"{summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
         if summary["final_loss"] is not None else "-"),
        ("tokens (trained)", f"{summary['tokens']:,} ({summary['trained_tokens']:,})"),
        ("examples (truncated, dropped)", "{records} ({truncated}, {dropped})".format(**summary["data"])
         if {"records", "truncated", "dropped"} <= set(summary.get("data", {})) else "-"),
        ("tokens/s", f"{summary['tokens_per_s_measured']:,.0f}"),
        ("peak memory", f"{summary['peak_memory_bytes_measured'] / 2**30:.2f} GiB ({summary['peak_memory_kind']})"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if summary.get("plan_vs_measured"):  # on a GPU: the planner checked against this very run
        from onecard.plan.compare import format_lines

        for line in format_lines(summary["plan_vs_measured"]):
            console.print(line)
