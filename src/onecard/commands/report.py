"""`onecard report RUN_DIR [--out FILE]`: one self-contained HTML page about a run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        run_dir: Path = typer.Argument(..., help="Run directory written by onecard train."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default: RUN_DIR/report.html)."),
    ) -> None:
        """Loss curves, throughput and memory over time, plan vs measured memory, eval table, before/after samples."""
        from rich.console import Console

        from onecard.eval.report import write_report

        path = write_report(run_dir, out)
        Console(highlight=False).print(f"wrote {path} (self-contained: open it in any browser, offline)")
