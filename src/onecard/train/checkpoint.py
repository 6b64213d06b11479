"""Atomic training checkpoints: ``checkpoints/step-<N>/`` plus a ``latest`` pointer.

A checkpoint is written into a temporary directory next to its final place, every file fsynced, then
renamed into place (rename is atomic within one filesystem, POSIX rename(2)); only then is ``latest``
replaced, itself through a temp file and ``os.replace``. A crash at any moment therefore leaves either the
old checkpoint or the new one complete, never a half-written one that ``load_latest`` would pick.

Contents: trainable weights (safetensors: the LoRA/DoRA tensors, or every weight for full fine-tuning),
optimizer state, scheduler step, every RNG state (Python, NumPy, torch CPU, CUDA) so dropout continues
identically, epoch and position inside the epoch, global step, and the metrics logged so far.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KEEP_CHECKPOINTS = 2  # the newest and its predecessor: enough to survive a crash while writing the next one
_STATE_FILE = "state.json"  # written last inside the temp dir: its presence marks a complete checkpoint


@dataclass
class TrainState:
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens_seen: int = 0
    trained_tokens: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model) -> dict[str, Any]:
    """Trainable tensors by parameter name, detached copies (safetensors refuses shared storage)."""
    return {name: p.detach().to("cpu").clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, tensors: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in tensors]
    if missing:
        raise RuntimeError(f"checkpoint lacks trainable tensors {missing[:3]} (different recipe?)")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def save_checkpoint(run_dir: Path, model, optimizer, state: TrainState, scheduler_state: dict[str, Any]) -> Path:
    import torch
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.global_step}"
    tmp = root / f".tmp-step-{state.global_step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(trainable_state_dict(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler_state, "rng": rng_state()},
                   tmp / "optimizer_rng.pt")
        (tmp / _STATE_FILE).write_text(json.dumps(asdict(state)), encoding="utf-8")
        for child in tmp.iterdir():
            _fsync_file(child)
        _fsync_dir(tmp)
    except BaseException:  # a full disk or a kill: give back the space of the half-written copy, keep the old one
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = root / f".old-step-{state.global_step}-{os.getpid()}"
    if final.exists():  # a re-save of the same step after resume: move the old one aside, drop it after
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_latest(root, final.name)
    shutil.rmtree(old, ignore_errors=True)
    _prune(root, keep=KEEP_CHECKPOINTS)
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".latest.tmp-{os.getpid()}"
    tmp.write_text(name + "\n", encoding="utf-8")
    _fsync_file(tmp)
    os.replace(tmp, root / "latest")
    _fsync_dir(root)


def _complete_steps(root: Path) -> list[int]:
    steps = []
    for child in root.glob("step-*"):
        if (child / _STATE_FILE).is_file() and child.name[5:].isdigit():
            steps.append(int(child.name[5:]))
    return sorted(steps)


def _prune(root: Path, keep: int) -> None:
    for step in _complete_steps(root)[:-keep]:
        shutil.rmtree(root / f"step-{step}", ignore_errors=True)
    for leftover in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, or the newest complete one if the pointer is missing or stale."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if (named / _STATE_FILE).is_file():
            return named
    steps = _complete_steps(root) if root.is_dir() else []
    return root / f"step-{steps[-1]}" if steps else None


def load_latest(run_dir: Path) -> dict[str, Any] | None:
    """Everything needed to resume: ``{"path", "state", "trainable", "optimizer", "scheduler", "rng"}``."""
    import torch
    from safetensors.torch import load_file

    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    state = TrainState(**json.loads((path / _STATE_FILE).read_text(encoding="utf-8")))
    # weights_only=False: the RNG states are NumPy/Python tuples; this file was written by onecard itself.
    blob = torch.load(path / "optimizer_rng.pt", map_location="cpu", weights_only=False)
    return {"path": path, "state": state, "trainable": load_file(str(path / "trainable.safetensors")),
            "optimizer": blob["optimizer"], "scheduler": blob["scheduler"], "rng": blob["rng"]}
