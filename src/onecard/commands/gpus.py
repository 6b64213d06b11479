"""`onecard gpus`: the GPU catalog the planner uses (every figure cited in onecard/catalog/gpus.py)."""

from __future__ import annotations

import typer

from onecard.commands.common import JsonOption, print_json


def register(app: typer.Typer) -> None:
    @app.command("gpus")
    def gpus(as_json: bool = JsonOption) -> None:
        """List the cards onecard can plan for: memory, bandwidth, dense bf16 TFLOP/s, host link."""
        from dataclasses import asdict

        from onecard.catalog.gpus import GPUS

        if as_json:
            print_json([asdict(g) for g in GPUS.values()])
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title="GPU catalog (datasheet figures; bf16 dense with fp32 accumulate)")
        for col in ("id", "name", "memory GiB", "bandwidth GB/s", "bf16 TFLOP/s", "host link GB/s", "source"):
            table.add_column(col)
        for g in GPUS.values():
            table.add_row(g.id, g.name, f"{g.memory_gib:.1f}", f"{g.bandwidth_gb_s:.0f}", f"{g.bf16_dense_tflops:.1f}",
                          f"{g.host_link_gb_s:.0f}", g.source)
        Console(highlight=False).print(table)
