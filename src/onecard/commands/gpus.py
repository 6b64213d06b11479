"""`onecard gpus` (not built yet)."""

from __future__ import annotations

import typer

from onecard.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("gpus")
    def gpus(ctx: typer.Context) -> None:
        """Not built yet."""
        raise UserError("'onecard gpus' is not built yet")
