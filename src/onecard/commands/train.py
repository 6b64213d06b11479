"""`onecard train` (not built yet)."""

from __future__ import annotations

import typer

from onecard.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(ctx: typer.Context) -> None:
        """Not built yet."""
        raise UserError("'onecard train' is not built yet")
