"""`onecard train RECIPE`: validate, load, train, save (the same path `onecard demo` takes)."""

from __future__ import annotations

from pathlib import Path

import typer

from onecard.commands.common import JsonOption, SetOption, print_json


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML file."),
        overrides: list[str] = SetOption,
        resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's latest checkpoint."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing run directory and start over."),
        as_json: bool = JsonOption,
    ) -> None:
        """Fine-tune (LoRA, QLoRA, DoRA or full) or continue pre-training as the recipe says."""
        from rich.console import Console

        from onecard.recipe import load_recipe

        recipe = load_recipe(recipe_path, overrides or [])
        console = Console(stderr=True, highlight=False)
        from onecard.train.loop import train as run_training

        summary = run_training(recipe, resume=resume, console=console, overwrite=overwrite)
        if as_json:
            print_json(summary)
            return
        _print_summary(Console(highlight=False), summary)


def _print_summary(console, summary: dict) -> None:
    from rich.table import Table

    table = Table(title="onecard train (measured)", show_header=False)
    rows = [
        ("output", summary["output"]),
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
