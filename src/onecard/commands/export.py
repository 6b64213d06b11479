"""`onecard export` (not built yet)."""

from __future__ import annotations

import typer

from onecard.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(ctx: typer.Context) -> None:
        """Not built yet."""
        raise UserError("'onecard export' is not built yet")
