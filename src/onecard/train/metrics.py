"""Training metrics: ``metrics.jsonl`` (one object per logged step), handed on to the ``logging:`` sinks
(train/sinks.py: TensorBoard under ``tb/``, W&B, MLflow), and a rich progress bar.

On resume the JSONL file is rewritten from the metrics stored in the checkpoint, so steps logged after the
checkpoint by the interrupted process do not appear twice.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any


def peak_memory_bytes(device: str) -> tuple[int, str]:
    """Peak memory so far and what it measures: CUDA reserved by the caching allocator, else process peak RSS."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_reserved()), "cuda_max_memory_reserved"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return int(rss_kib * scale), "process_peak_rss"


class MetricsLogger:
    """Appends metrics to JSONL, then to ``sinks`` (train/sinks.Sinks, or None); ``records`` holds everything logged
    in this run so far."""

    def __init__(self, run_dir: Path, records: list[dict[str, Any]] | None = None, sinks=None):
        self.run_dir = Path(run_dir)
        self.records: list[dict[str, Any]] = list(records or [])
        path = self.run_dir / "metrics.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for record in self.records:
                handle.write(json.dumps(record) + "\n")
        self._file = open(path, "a", encoding="utf-8")
        self._sinks = sinks

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._sinks is not None:
            self._sinks.log(record)

    def close(self, outcome: str = "finished") -> None:
        """``outcome``: finished, killed or failed (what the sinks record as the run's end)."""
        self._file.close()
        if self._sinks is not None:
            self._sinks.close(outcome)


class TrainProgress:
    """A rich progress bar showing loss, tokens/s, ETA and peak memory; silent when ``console`` is None.

    ``extra``: a short text the task adds beside the loss (DPO/KTO: reward accuracy, margin, KL).
    """

    def __init__(self, console, total_steps: int, start_step: int):
        self._progress = None
        if console is None:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]train[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[extra]}"), TextColumn("{task.fields[tps]} tok/s"), TextColumn("mem {task.fields[mem]}"), TextColumn("eta"),
            TimeRemainingColumn(), console=console, transient=False,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, loss="-", extra="", tps="-",
                                              mem="-")
        self._progress.start()

    def update(self, step: int, loss: float, tokens_per_s: float, peak_bytes: int, extra: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=f"{loss:.4f}", extra=extra,
                                  tps=f"{tokens_per_s:,.0f}", mem=f"{peak_bytes / 2**30:.2f} GiB")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
