"""When a checkpoint is written, and what a failed write tells the user.

By default every ``training.save_every_minutes`` (30) of training: an interrupted night loses at most that
much, and a small model that runs a thousand steps a minute does not spend its time writing checkpoints, which
a step interval would make it do. ``training.save_every_steps`` adds a step interval on top. A stop by signal
(train/signals.py) saves at once whatever the interval says.

A disk that fills while a checkpoint is written (ENOSPC, or EDQUOT for a quota) stops the run with one message:
the atomic write (train/files.py) has already removed its half-written temp directory, and the previous checkpoint,
never touched by a save until the new one is complete, is named as the one ``--resume`` continues from.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Callable

from onecard.errors import UserError
from onecard.recipe import Recipe

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class SaveClock:
    """Says whether the step just finished is due for a checkpoint (step interval or minutes since the last save)."""

    def __init__(self, recipe: Recipe, now=time.monotonic):
        self.every_steps = recipe.training.save_every_steps
        self.every_s = recipe.training.save_every_minutes * 60.0
        self._now = now
        self._last = now()

    def due(self, step: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_s) and self._now() - self._last >= self.every_s

    def saved(self) -> None:
        self._last = self._now()


def save_or_stop(run_dir: Path, save: Callable[[], Path], step: int, console=None) -> Path:
    """``save()`` (the task's checkpoint write, returning its directory), saying where it went; a full disk
    becomes a clean stop (UserError)."""
    from onecard.train.checkpoint import latest_checkpoint

    try:
        path = save()
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        previous = latest_checkpoint(run_dir)
        kept = (f"the previous checkpoint {previous} is intact; --resume continues from it" if previous is not None
                else "no earlier checkpoint exists, so the run cannot be resumed")
        raise UserError(f"the disk filled up while writing the checkpoint of step {step} "
                        f"({exc.strerror or exc}); training stopped, {kept}",
                        where=str(Path(run_dir) / "checkpoints"),
                        fix="free disk space there (or move output_dir), then run the same command with "
                        "--resume") from None
    if console is not None and path is not None:
        console.print(f"[dim]checkpoint step {step} -> {path}[/dim]")
    return path
