"""`onecard lint RECIPE`: pre-flight checks of the recipe, its model and its data; exit 1 when any error is found."""

from __future__ import annotations

from pathlib import Path

import typer

from onecard.commands.common import JsonOption, SetOption, print_json

STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def register(app: typer.Typer) -> None:
    @app.command("lint")
    def lint(
        recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML file."),
        overrides: list[str] = SetOption,
        as_json: bool = JsonOption,
    ) -> None:
        """Check a recipe, its model and its data for known fine-tuning mistakes before training (exit 1 on errors).

        With a local model (directory or .gguf) it also measures the data's token lengths; onecard plan then
        uses those counts for time and cost."""
        from onecard.errors import EXIT_USER_ERROR, UserError
        from onecard.lint import lint_recipe
        from onecard.lint.data import store_stats
        from onecard.recipe import load_recipe

        try:
            recipe = load_recipe(recipe_path, overrides or [])
        except UserError as err:
            if not as_json:
                raise
            print_json({"error": {"what": err.what, "where": err.where, "fix": err.fix}, "findings": [], "errors": 1})
            raise SystemExit(EXIT_USER_ERROR) from None
        reports: dict = {}
        findings = lint_recipe(recipe, data_tokens=True, reports=reports)
        for report in reports.values():
            store_stats(recipe, report)
        errors = sum(f.severity == "error" for f in findings)
        if as_json:
            print_json({"findings": [f.to_dict() for f in findings], "errors": errors,
                        "data": {name: r.to_dict() for name, r in reports.items()}})
        else:
            _print(findings, reports, errors)
        if errors:
            raise SystemExit(1)  # cli.main runs click with standalone_mode=False, which swallows typer.Exit codes


def _print(findings, reports: dict, errors: int) -> None:
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False)
    for name, r in reports.items():
        console.print(Text(data_line(name, r), style="dim" if r.mean_tokens is None else ""))
    for f in findings:  # Text, not markup: a rule id like [does-not-fit] would read as a style tag
        head = Text.assemble((f.severity, STYLE[f.severity]), f" [{f.id}] ", f"{f.where}: " if f.where else "",
                             f.message)
        console.print(head)
        console.print(Text(f"    why: {f.why}\n    fix: {f.fix}"))
    console.print(f"{errors} error(s), {len(findings) - errors} other finding(s)" if findings
                  else "[green]no findings[/green]")


def data_line(name: str, r) -> str:
    """``data.path: train.jsonl: 480 examples (chat), tokens per example: mean 81, p95 120, max 150``."""
    head = f"{name}: {r.path}: {r.records:,} records ({r.format})"
    if r.mean_tokens is None:
        return f"{head}; {r.note}"
    dropped = f", {r.records - r.examples:,} without an assistant turn (dropped)" if r.records > r.examples else ""
    return (f"{head}{dropped}; tokens per example: mean {r.mean_tokens:,.0f}, p95 {r.p95_tokens:,}, "
            f"max {r.max_tokens:,}; {r.truncated:,} longer than data.seq_len")
