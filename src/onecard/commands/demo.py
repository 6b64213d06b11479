"""`onecard demo` (not built yet)."""

from __future__ import annotations

import typer

from onecard.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(ctx: typer.Context) -> None:
        """Not built yet."""
        raise UserError("'onecard demo' is not built yet")
