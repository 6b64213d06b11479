"""`onecard bench` (not built yet)."""

from __future__ import annotations

import typer

from onecard.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(ctx: typer.Context) -> None:
        """Not built yet."""
        raise UserError("'onecard bench' is not built yet")
