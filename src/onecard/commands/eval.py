"""`onecard eval (RUN_DIR | --model DIR [--adapter DIR]) --data FILE [--baseline]`: did the tune help?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from onecard.commands.common import JsonOption, print_json, quiet_transformers

ROWS = [("loss", "held-out loss", "{:.4f}"), ("perplexity", "perplexity", "{:.3f}"),
        ("exact_match", "exact match", "{:.1%}"), ("token_f1", "token F1", "{:.1%}"), ("rouge_l", "ROUGE-L", "{:.1%}")]


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        run_dir: Optional[Path] = typer.Argument(None, help="Run directory written by onecard train."),
        model: Optional[str] = typer.Option(None, "--model", help="A model directory, instead of a run directory."),
        adapter: Optional[str] = typer.Option(None, "--adapter", help="PEFT adapter directory to put on --model."),
        data: Optional[str] = typer.Option(None, "--data", help="Eval file (JSONL/JSON/Parquet/CSV); default: the recipe's eval split."),
        baseline: bool = typer.Option(False, "--baseline", help="Also evaluate the base model (adapter disabled) and show the difference."),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Generation length (default: recipe eval.max_new_tokens, 64)."),
        max_examples: Optional[int] = typer.Option(None, "--max-examples", min=1, help="Evaluate only the first N examples."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Examples per forward / generate call."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Where to write the JSON results (default: RUN_DIR/eval.json)."),
        json_out: bool = JsonOption,
    ) -> None:
        """Held-out loss/perplexity and greedy-generation metrics (exact match, token F1, ROUGE-L)."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from onecard.errors import UserError
        from onecard.eval import evaluate
        from onecard.eval.runs import load_model_dirs, load_run

        if (run_dir is None) == (model is None):
            raise UserError("give a run directory or --model DIR (not both)", where="onecard eval",
                            fix="onecard eval runs/NAME --data eval.jsonl, or onecard eval --model DIR [--adapter DIR] --data eval.jsonl")
        if adapter and model is None:
            raise UserError("--adapter needs --model (the base it was trained on)", where="--adapter")
        if run_dir is None and data is None:
            raise UserError("--data is required with --model", where="--data", fix="pass --data eval.jsonl")
        quiet_transformers()
        console = Console(stderr=True, highlight=False)
        with console.status("loading model ..."):
            loaded = load_run(run_dir, device) if run_dir is not None else load_model_dirs(model, adapter, device)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            result = evaluate(loaded.model, loaded.tokenizer, loaded.recipe, data, baseline=baseline,
                              max_new_tokens=max_new_tokens, max_examples=max_examples, batch_size=batch_size,
                              progress=progress)
        result["model"] = {"run_dir": str(run_dir) if run_dir else None, "base": loaded.base_source,
                           "adapter": str(loaded.adapter_path) if loaded.adapter_path else None}
        target = out or (Path(run_dir) / "eval.json" if run_dir is not None else None)
        if target is not None:
            target.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        if json_out:
            print_json(result)
            return
        _print_table(Console(highlight=False), result, target)


def _print_table(console, result: dict, target) -> None:
    from rich.table import Table

    from onecard.eval.harness import HIGHER_IS_BETTER

    has_base = "baseline" in result
    table = Table(title=f"eval on {result['data']} ({result['examples']['loss']} examples for loss, "
                        f"{result['examples']['generation']} with references; greedy, {result['decoding']['max_new_tokens']} new tokens)")
    table.add_column("metric")
    if has_base:
        table.add_column("base", justify="right")
    table.add_column("tuned" if has_base else "value", justify="right")
    if has_base:
        table.add_column("Δ", justify="right")
    for key, label, fmt in ROWS:
        if key not in result["tuned"]:
            continue
        row = [label]
        if has_base:
            row.append(fmt.format(result["baseline"][key]))
        row.append(fmt.format(result["tuned"][key]))
        if has_base:
            delta = result["delta"][key]
            better = (delta > 0) == HIGHER_IS_BETTER[key] and delta != 0
            sign = "+" if delta > 0 else ""
            text = f"{sign}{delta:.4f}" if "%" not in fmt else f"{sign}{delta * 100:.1f} pt"
            row.append(f"[{'green' if better else 'red'}]{text}[/]")
        table.add_row(*row)
    console.print(table)
    if target is not None:
        console.print(f"[dim]saved {target}[/dim]")

