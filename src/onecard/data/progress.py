"""Progress of data preparation: one rich bar per phase (examples/s, ETA), always on stderr.

stdout stays clean for ``--json``. Worker processes of ``datasets.map`` report through a manager queue that a
thread of this process drains into the bar: ``datasets`` shows only its own tqdm bar, without a hook for ours.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any


RATE_EVERY_S = 0.25  # the examples/s column's refresh (rich redraws 10 times a second)


class Phases:
    """``with Phases(enabled) as phases: bar = phases.bar("tokenising", total); bar(n)``; a no-op when disabled."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress = None
        self.seconds: dict[str, float] = {}  # wall time per phase, each ending when the next one starts
        self._current: tuple[str, float, Any] | None = None

    def __enter__(self) -> "Phases":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]data[/bold] {task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(stderr=True, highlight=False), transient=False,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._close_phase()
        if self._progress is not None:
            self._progress.stop()

    def _close_phase(self) -> None:
        if self._current is not None:
            name, started, task = self._current
            self.seconds[name] = round(time.perf_counter() - started, 3)
            if task is not None:  # an open-ended bar (reading) is complete now: show it full
                done = self._progress.tasks[task].completed
                self._progress.update(task, total=done, completed=done)
        self._current = None

    def bar(self, description: str, total: int | None):
        """A callable ``advance(n)`` for one phase; it also shows examples/s."""
        self._close_phase()
        if self._progress is None:
            self._current = (description, time.perf_counter(), None)
            return lambda n=1: None
        progress = self._progress
        task = progress.add_task(description, total=total, rate="")
        self._current = (description, time.perf_counter(), task)

        shown = [0.0]  # when the rate was last computed

        def advance(n: int = 1) -> None:
            progress.advance(task, n)
            now = time.perf_counter()
            if now - shown[0] < RATE_EVERY_S:  # rich's speed sums its whole sample window: not once per record
                return
            shown[0] = now
            speed = progress.tasks[task].speed
            if speed:
                progress.update(task, rate=f"{speed:,.0f} ex/s")

        return advance

    def say(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, soft_wrap=True)


@contextmanager
def worker_reports(advance, num_proc: int):
    """A picklable ``report(n)`` for map workers that calls ``advance(n)`` here; plain ``advance`` in-process."""
    if num_proc <= 1:
        yield advance
        return
    import multiprocess

    manager = multiprocess.Manager()
    queue = manager.Queue()

    def drain() -> None:
        while (n := queue.get()) is not None:
            advance(n)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield queue.put
    finally:
        queue.put(None)
        thread.join(timeout=5)
        manager.shutdown()
