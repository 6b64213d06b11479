"""The run directory: refuse to clobber, create only after inputs are validated, write results atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from onecard.errors import UserError
from onecard.recipe import Recipe, dump_recipe
from onecard.train.files import write_atomic, write_text_atomic


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Fail before any work if the run directory's state contradicts the flags (nothing is written here).

    Each refusal names a flag that works for the state found, so the advice never sends the user in a circle.
    """
    from onecard.train.checkpoint import latest_checkpoint

    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other", fix="pass one of them")
    holds_run = run_dir.is_dir() and any(run_dir.iterdir())
    latest = latest_checkpoint(run_dir) if holds_run else None
    if resume:
        if latest is None and holds_run:
            raise UserError("no checkpoint to resume from: the run stopped before its first checkpoint was written",
                            where=str(run_dir), fix="start it again with --overwrite instead of --resume "
                            "(checkpoints follow training.save_every_minutes / save_every_steps)")
        if latest is None:
            raise UserError("nothing to resume: the run directory holds no run", where=str(run_dir),
                            fix="drop --resume to start the run")
        return
    if holds_run and not overwrite:
        if (run_dir / "summary.json").is_file():
            raise UserError("the run directory already holds a finished run", where=str(run_dir),
                            fix="pass --overwrite to start over, or change name/output_dir")
        if latest is None:
            raise UserError("the run directory holds an unfinished run that wrote no checkpoint", where=str(run_dir),
                            fix="pass --overwrite to start over (there is nothing to resume), or change name/output_dir")
        raise UserError(f"the run directory already holds an unfinished run (last checkpoint: {latest.name})",
                        where=str(run_dir), fix="pass --resume to continue it, --overwrite to start over, "
                        "or change name/output_dir")


def recipe_changes(run_dir: Path, recipe: Recipe) -> list[str]:
    """Dotted fields whose value differs from the recipe stored in the run directory (resume sanity check)."""
    import yaml

    stored_path = run_dir / "recipe.yaml"
    if not stored_path.is_file():
        return []
    stored = yaml.safe_load(stored_path.read_text(encoding="utf-8")) or {}
    current = yaml.safe_load(dump_recipe(recipe))
    return sorted(_diff(stored, current, ""))


def _diff(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in set(old) | set(new):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def prepare_run_dir(run_dir: Path, recipe: Recipe, overwrite: bool) -> None:
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").unlink(missing_ok=True)  # a resumed run is unfinished until it ends again
    write_text_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def save_result(run_dir: Path, model, tokenizer, is_adapter: bool) -> Path:
    """``adapter/`` (PEFT, safetensors) or ``model/`` (transformers format), tokenizer beside the weights.

    Written to a temp directory and renamed, so a crash here never leaves a half-written result.
    """
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = True  # switched off for gradient checkpointing; generation wants it back

    def fill(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    return write_atomic(run_dir / ("adapter" if is_adapter else "model"), fill)
