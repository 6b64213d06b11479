"""`onecard models` (not built yet)."""

from __future__ import annotations

import typer

from onecard.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models(ctx: typer.Context) -> None:
        """Not built yet."""
        raise UserError("'onecard models' is not built yet")
