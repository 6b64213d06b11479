"""What ``--resume`` may do to a run directory: a finished run is left as it is; a changed recipe needs a flag.

A finished run (``summary.json`` present) is never re-entered: its weights, summary and recipe stay byte for
byte. Resuming an unfinished run with a recipe that differs from its ``recipe.yaml`` is refused unless
``--allow-recipe-change`` is given, because steps 1..k ran under the stored recipe and the rest would not; with
the flag the history is kept: the recipe in force until the checkpoint's step is copied to
``recipe_history/recipe-until-step-<k>.yaml`` and every resume is one line of ``resumes.jsonl``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from onecard.errors import UserError
from onecard.recipe import Recipe

ALLOW_FLAG = "--allow-recipe-change"
# Fields a resume may change without the flag: how a run is watched or saved, never what it computes; and the
# GPU count, which distributed_loop.check_resume_world refuses on its own, naming the count the checkpoint needs.
NOT_REFUSED_PREFIXES = ("training.save_every_steps", "training.save_every_minutes", "training.log_every_steps",
                        "training.grad_norm_blowup", "eval.", "plan.", "logging.", "training.num_gpus")
HISTORY_DIR = "recipe_history"
RESUMES_FILE = "resumes.jsonl"


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The stored summary of a finished run, or None when the run is not finished."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def check_resume(recipe: Recipe, resume: bool, allow_recipe_change: bool = False) -> dict[str, Any] | None:
    """Before any work. Returns the stored summary when ``--resume`` meets a finished run with the same recipe
    (the caller then does nothing); raises UserError for a changed recipe that the flags do not allow."""
    if not resume:
        return None
    run_dir = recipe.run_dir
    changed = computing_changes(run_dir, recipe)
    done = finished_summary(run_dir)
    if done is not None:
        if changed:
            raise UserError(f"the run is finished ({done.get('steps')} steps); --resume leaves it as it is, and "
                            f"this recipe differs from its recipe.yaml in: {', '.join(changed)}", where=str(run_dir),
                            fix="to train further from it, start a new run: --set adapter.init_adapter="
                            f"{run_dir / 'adapter'} name=<new name> (or --overwrite to redo this one)")
        return done
    if changed and not allow_recipe_change:
        raise UserError(f"this recipe differs from the run's recipe.yaml in: {', '.join(changed)}; the steps "
                        "already taken used the stored values", where=str(run_dir),
                        fix=f"resume with the stored recipe ({run_dir / 'recipe.yaml'}), or pass {ALLOW_FLAG} to "
                        "continue under the new one (the old one is kept in recipe_history/)")
    return None


def computing_changes(run_dir: Path, recipe: Recipe) -> list[str]:
    """Changed fields that alter what the run computes (``NOT_REFUSED_PREFIXES`` left out)."""
    from onecard.train.rundir import recipe_changes

    return [f for f in recipe_changes(run_dir, recipe) if not f.startswith(NOT_REFUSED_PREFIXES)]


def record_resume(run_dir: Path, recipe: Recipe, console=None) -> dict[str, Any]:
    """Before ``recipe.yaml`` is rewritten on resume: keep the old recipe if it changed, append to resumes.jsonl."""
    import yaml

    from onecard.recipe import dump_recipe
    from onecard.train.checkpoint import latest_checkpoint
    from onecard.train.rundir import recipe_changes

    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    step = int(ckpt.name.split("-")[1]) if ckpt is not None else 0
    stored_path = run_dir / "recipe.yaml"
    changed = recipe_changes(run_dir, recipe)
    entry: dict[str, Any] = {"resumed_at_step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changed": {}}
    if changed:
        before = yaml.safe_load(stored_path.read_text(encoding="utf-8")) or {}
        after = yaml.safe_load(dump_recipe(recipe))
        entry["changed"] = {f: {"before": _get(before, f), "after": _get(after, f)} for f in changed}
        kept = run_dir / HISTORY_DIR / f"recipe-until-step-{step}.yaml"
        kept.parent.mkdir(exist_ok=True)
        shutil.copyfile(stored_path, kept)
        entry["previous_recipe"] = str(kept.relative_to(run_dir))
        if console is not None:
            console.print(f"[yellow]resuming at step {step} with a changed recipe ({', '.join(changed)}); the "
                          f"previous one is kept in {kept}[/yellow]")
    with open(run_dir / RESUMES_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, default=str) + "\n")
    return entry


def _get(tree: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree
