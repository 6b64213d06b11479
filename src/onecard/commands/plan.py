"""`onecard plan` (not built yet)."""

from __future__ import annotations

import typer

from onecard.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan(ctx: typer.Context) -> None:
        """Not built yet."""
        raise UserError("'onecard plan' is not built yet")
