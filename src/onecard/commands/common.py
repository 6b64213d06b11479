"""Options and helpers shared by the verb modules."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

SetOption = typer.Option(None, "--set", help="Override any recipe field: --set training.learning_rate=1e-4 (repeatable).")
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")


def quiet_transformers() -> None:
    """For commands that load models: transformers' per-load bars ("Loading weights", "Writing model shards") and
    info logs give way to onecard's own progress. Long library work keeps its bar (GGUF de-quantisation uses
    tqdm directly). Imports transformers: call it inside the command, not at import."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
