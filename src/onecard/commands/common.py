"""Options and helpers shared by the verb modules."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

SetOption = typer.Option(None, "--set", help="Override any recipe field: --set training.learning_rate=1e-4 (repeatable).")
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
