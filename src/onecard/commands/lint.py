"""`onecard lint RECIPE`: pre-flight checks; exit 1 when any error is found."""

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
        """Check a recipe for known fine-tuning mistakes before anything is loaded (exit 1 on errors)."""
        from onecard.lint import lint_recipe
        from onecard.recipe import load_recipe

        recipe = load_recipe(recipe_path, overrides or [])
        findings = lint_recipe(recipe)
        errors = sum(f.severity == "error" for f in findings)
        if as_json:
            print_json({"findings": [f.to_dict() for f in findings], "errors": errors})
        else:
            from rich.console import Console

            console = Console(highlight=False)
            for f in findings:
                console.print(f"[{STYLE[f.severity]}]{f.severity}[/] [{f.id}] {f.message}")
                console.print(f"    why: {f.why}\n    fix: {f.fix}")
            console.print(f"{errors} error(s), {len(findings) - errors} other finding(s)" if findings
                          else "[green]no findings[/green]")
        if errors:
            raise SystemExit(1)  # cli.main runs click with standalone_mode=False, which swallows typer.Exit codes
