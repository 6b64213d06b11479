"""`onecard demo`: fine-tune a real small model on a bundled task, on CPU, and show before / after."""

from __future__ import annotations

from pathlib import Path

import typer

from onecard.commands.common import JsonOption, print_json, quiet_transformers

N_SAMPLES_SHOWN = 2


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory to write (a previous demo run "
                                 "there is replaced)."),
        steps: int = typer.Option(20, "--steps", min=1, help="LoRA optimizer steps (4 examples each)."),
        as_json: bool = JsonOption,
    ) -> None:
        """LoRA-tune SmolLM2-135M-Instruct to answer in a support bot's house style, with no network.

        ~100 s on 2 idle CPU cores (measured, first run included). Prints held-out loss and a task score
        (0-100) before and after; exit 1 if the tuned model does not beat the base by 30 points."""
        from rich.console import Console

        from transformers.utils import logging as hf_logging

        from onecard.demo.run import MIN_GAIN, run_demo

        hf_logging.disable_progress_bar()  # per-tensor loading bars would bury the demo's own four steps
        progress_console = Console(stderr=True, highlight=False)
        quiet_transformers()
        result = run_demo(out, steps, console=progress_console)
        if as_json:
            print_json({k: v for k, v in result.items() if k != "samples"})
        else:
            _print_result(Console(highlight=False), result)
        if not result["passed"]:
            progress_console.print(f"[bold red]demo failed[/bold red]: the tuned model gained "
                                   f"{result['change']['style_score']:+.1f} style points (needs +{MIN_GAIN:.0f}) "
                                   f"and held-out loss changed by {result['change']['heldout_loss']:+.3f}")
            raise typer.Exit(1)


_ROWS = [  # (key, label, format, lower is better)
    ("heldout_loss", "held-out loss (nats/token)", "{:.3f}", True),
    ("style_score", "house-style score (0-100)", "{:.1f}", False),
    ("rule_greeting", "  starts with the greeting (%)", "{:.0f}", False),
    ("rule_sign_off", "  ends with the sign-off (%)", "{:.0f}", False),
    ("rule_three_lines", "  greeting / one line / sign-off (%)", "{:.0f}", False),
    ("rule_brief", "  brief, complete sentence (%)", "{:.0f}", False),
]


def _print_result(console, result: dict) -> None:
    from rich.panel import Panel
    from rich.table import Table

    base, tuned, change = result["base"], result["tuned"], result["change"]
    table = Table(title=f"onecard demo: {result['data']['heldout_prompts']} held-out questions (measured)")
    for col in ("metric", "base", "tuned", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, label, fmt, lower_better in _ROWS:
        delta = change[key]
        good = delta < 0 if lower_better else delta > 0
        colour = "green" if good else ("red" if delta else "white")
        table.add_row(label, fmt.format(base[key]), fmt.format(tuned[key]),
                      f"[{colour}]{'+' if delta >= 0 else ''}{fmt.format(delta)}[/{colour}]")
    console.print(table)
    for sample in result["samples"][:N_SAMPLES_SHOWN]:
        body = (f"[bold]Q:[/bold] {sample['prompt']}\n\n[bold]base:[/bold]\n{sample['base']}\n\n"
                f"[bold]tuned:[/bold]\n{sample['tuned']}")
        console.print(Panel(body, expand=False))
    train, secs = result["training"], result["seconds_measured"]
    console.print(f"training: {train['steps']} steps, loss {train['first_loss']:.3f} -> {train['final_loss']:.3f}, "
                  f"{train['tokens_per_s_measured']:.0f} tokens/s (measured)")
    console.print(f"time (measured): {secs['total']:.0f} s total = model {secs['materialize']:.0f} s + base eval "
                  f"{secs['base_eval']:.0f} s + train {secs['train']:.0f} s + tuned eval {secs['tuned_eval']:.0f} s")
    console.print(f"run directory: {result['run_dir']} (adapter: {result['adapter']}; numbers: "
                  f"{Path(result['run_dir']) / 'demo.json'})")
