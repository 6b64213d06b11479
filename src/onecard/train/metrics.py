"""Training metrics: ``metrics.jsonl`` (one object per logged step), TensorBoard under ``tb/``, a rich progress bar.

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
    """Appends metrics to JSONL and TensorBoard; ``records`` holds everything logged in this run so far."""

    def __init__(self, run_dir: Path, records: list[dict[str, Any]] | None = None):
        self.run_dir = Path(run_dir)
        self.records: list[dict[str, Any]] = list(records or [])
        path = self.run_dir / "metrics.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for record in self.records:
                handle.write(json.dumps(record) + "\n")
        self._file = open(path, "a", encoding="utf-8")
        self._tb = _tensorboard_writer(self.run_dir / "tb")

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is optional: JSONL is the record of truth
        return None
    return SummaryWriter(log_dir=str(path))


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
