"""`onecard report` (not built yet)."""

from __future__ import annotations

import typer

from onecard.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(ctx: typer.Context) -> None:
        """Not built yet."""
        raise UserError("'onecard report' is not built yet")
