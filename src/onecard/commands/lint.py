"""`onecard lint` (not built yet)."""

from __future__ import annotations

import typer

from onecard.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("lint")
    def lint(ctx: typer.Context) -> None:
        """Not built yet."""
        raise UserError("'onecard lint' is not built yet")
