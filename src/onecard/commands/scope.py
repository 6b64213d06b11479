"""`onecard scope` (not built yet)."""

from __future__ import annotations

import typer

from onecard.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("scope")
    def scope(ctx: typer.Context) -> None:
        """Not built yet."""
        raise UserError("'onecard scope' is not built yet")
