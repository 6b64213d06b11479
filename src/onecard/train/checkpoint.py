"""Atomic training checkpoints: ``checkpoints/step-<N>/`` plus a ``latest`` pointer.

A checkpoint is written into a temporary directory next to its final place, every file fsynced, then
renamed into place (train/files.py ``write_atomic``); only then is ``latest`` replaced, the same way. A crash at
any moment therefore leaves either the old checkpoint or the new one complete, never a half-written one that
``load_latest`` would pick.

Contents: trainable weights (safetensors: the LoRA/DoRA tensors, or every weight for full fine-tuning),
optimizer state, scheduler step, every RNG state (Python, NumPy, torch CPU, CUDA) so dropout continues
identically, epoch and position inside the epoch, global step, and the metrics logged so far.

A run on N processes adds ``ranks-step-<N>/`` beside ``step-<N>/``: ``world.json`` and one ``rank-<r>.pt`` per
rank (train/distributed_loop.py). It resumes on the same number of processes only (:func:`check_resume_world`).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from onecard.errors import UserError
from onecard.train.files import sweep_leftovers, write_atomic, write_text_atomic

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


def save_checkpoint(run_dir: Path, model, optimizer, state: TrainState, scheduler_state: dict[str, Any], *,
                    trainable: dict[str, Any] | None = None, optimizer_state: dict[str, Any] | None = None) -> Path:
    """``trainable`` / ``optimizer_state``: tensors gathered elsewhere (FSDP) instead of the model's and the
    optimizer's own."""
    import torch
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        tmp.mkdir()
        tensors = trainable_state_dict(model) if trainable is None else {k: v.contiguous() for k, v in trainable.items()}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        opt = optimizer.state_dict() if optimizer_state is None else optimizer_state
        torch.save({"optimizer": opt, "scheduler": scheduler_state, "rng": rng_state()},
                   tmp / "optimizer_rng.pt")
        (tmp / _STATE_FILE).write_text(json.dumps(asdict(state)), encoding="utf-8")

    final = write_atomic(root / f"step-{state.global_step}", fill)  # a re-save after resume replaces the old one
    write_text_atomic(root / "latest", final.name + "\n")
    _prune(root, keep=KEEP_CHECKPOINTS)
    return final


def _complete_steps(root: Path) -> list[int]:
    steps = []
    for child in root.glob("step-*"):
        if (child / _STATE_FILE).is_file() and child.name[5:].isdigit():
            steps.append(int(child.name[5:]))
    return sorted(steps)


def _prune(root: Path, keep: int) -> None:
    for step in _complete_steps(root)[:-keep]:
        shutil.rmtree(root / f"step-{step}", ignore_errors=True)
    sweep_leftovers(root, "step-*")
    for ranks in root.glob("ranks-step-*"):  # a multi-GPU run's rank files go with their step directory
        if not (root / ranks.name[len("ranks-"):]).is_dir():
            shutil.rmtree(ranks, ignore_errors=True)


def ranks_dir(step_dir: Path) -> Path:
    """Where the rank files of a multi-GPU checkpoint ``step_dir`` live."""
    return step_dir.parent / f"ranks-{step_dir.name}"


def check_resume_world(run_dir: Path, world: int) -> None:
    """Refuse to resume on a different number of processes than wrote the checkpoint (also for one GPU)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return
    meta = ranks_dir(path) / "world.json"
    written = json.loads(meta.read_text(encoding="utf-8"))["world_size"] if meta.is_file() else 1
    if written != world:
        raise UserError(f"the checkpoint was written by {written} process(es); resuming on {world} is not supported "
                        "(the data split and sharded states depend on the number of GPUs)", where=str(path),
                        fix=f"resume with --num-gpus {written}" if written > 1 else "resume without --num-gpus")


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
