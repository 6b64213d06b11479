"""``python -m onecard.bench ...`` = ``onecard bench ...`` without importing the other verbs (on a GPU machine that
lacks some of their dependencies, the benchmark still runs)."""

from __future__ import annotations

import sys

import typer

from onecard.commands.bench import register
from onecard.errors import EXIT_USER_ERROR, UserError


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    try:
        app(standalone_mode=False)
    except UserError as err:
        sys.stderr.write(f"error {err.render()}\n")
        sys.exit(EXIT_USER_ERROR)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
