"""`onecard eval` (not built yet)."""

from __future__ import annotations

import typer

from onecard.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval(ctx: typer.Context) -> None:
        """Not built yet."""
        raise UserError("'onecard eval' is not built yet")
