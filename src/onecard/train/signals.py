"""SIGINT (Ctrl-C) and SIGTERM (what a preempted spot instance or ``kill`` sends) stop a run with a checkpoint.

The handler only records the signal: the step under way finishes, a checkpoint of it is written
(train/save_policy.py), and the run stops with :class:`RunInterrupted`, which says where the checkpoint went and
how to continue. A signal that arrives *during* a save changes nothing in that save: it completes, atomically
(train/checkpoint.py), and the stop follows it. A second Ctrl-C stops at once, without a checkpoint, as a user
pressing it twice expects; a second SIGTERM is ignored until the save is done (the sender's SIGKILL remains).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from onecard.errors import UserError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(UserError):
    """The run stopped on a signal after saving a checkpoint; exits 128 + the signal number, as shells expect."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        saved = f"checkpoint saved to {checkpoint}" if checkpoint is not None else "no checkpoint was saved"
        super().__init__(f"stopped by {name} after step {step}: {saved}", where=None,
                         fix="continue with the same onecard train command plus --resume")


class StopSignals:
    """Installs the handlers on ``install()`` (main thread only: Python delivers signals there), restores on
    ``uninstall()``. ``signum`` is the first stop signal received, or None."""

    def __init__(self, console=None):
        self.console = console
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now
            return
        self.signum = signum
        if self.console is not None:
            self.console.print(f"[yellow]{signal.Signals(signum).name}: finishing this step, then saving a "
                               "checkpoint and stopping (Ctrl-C again stops at once, without saving)[/yellow]")

    def interrupted(self, step: int, checkpoint: Path | None) -> RunInterrupted:
        return RunInterrupted(self.signum, step, checkpoint)
