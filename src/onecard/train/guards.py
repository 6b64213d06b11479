"""Faults that end a run cleanly: a NaN/inf loss or gradient-norm blow-up, and CUDA out-of-memory.

:class:`StepGuard` runs after backward and clipping but *before* ``optimizer.step()``: a bad step never reaches
the weights or the optimizer state, and the run stops before any checkpoint of it can be written, so the last
checkpoint on disk is the last good state. A blow-up is a gradient norm above ``training.grad_norm_blowup``
times the median of the last ``WINDOW`` steps' norms (once ``MIN_HISTORY`` are known): clipping bounds the update,
but a norm that jumps by that much is the usual first sign of a diverging run, one step before the NaN.

:func:`out_of_memory` turns ``torch.cuda.OutOfMemoryError`` into a message with the step, the planner's figure
next to the measured peak, and the plan's cheapest change that lowers memory.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from pathlib import Path

from onecard.errors import UserError
from onecard.recipe import Recipe

WINDOW = 20
MIN_HISTORY = 5


class RunDiverged(UserError):
    """The loss or the gradient went non-finite or blew up; nothing of that step was applied or saved."""


class StepGuard:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.blowup = recipe.training.grad_norm_blowup
        self.norms: deque[float] = deque(maxlen=WINDOW)

    def check(self, step: int, loss: float, grad_norm: float | None) -> None:
        """``step`` 0-based (the one about to be applied); raises :class:`RunDiverged` on a bad step."""
        if not math.isfinite(loss):
            raise self._diverged(step, f"the loss is {loss}")
        if grad_norm is None:
            return
        if not math.isfinite(grad_norm):
            raise self._diverged(step, f"the gradient norm is {grad_norm} (loss {loss:.4f})")
        if self.blowup and len(self.norms) >= MIN_HISTORY:
            median = statistics.median(self.norms)
            if median > 0 and grad_norm > self.blowup * median:
                raise self._diverged(step, f"the gradient norm blew up to {grad_norm:.4g}, {grad_norm / median:.0f}x "
                                     f"the median {median:.4g} of the last {len(self.norms)} steps "
                                     f"(training.grad_norm_blowup={self.blowup:g})")
        self.norms.append(grad_norm)

    def _diverged(self, step: int, what: str) -> RunDiverged:
        return RunDiverged(f"training stopped at step {step + 1}: {what}; that step was not applied. "
                           f"{last_checkpoint_text(self.recipe.run_dir)}", where=str(self.recipe.run_dir),
                           fix=f"lower training.learning_rate (now {self.recipe.training.learning_rate:g}) or "
                           "training.max_grad_norm, then --resume --allow-recipe-change --set "
                           "training.learning_rate=... (or --overwrite); training.grad_norm_blowup=null turns the "
                           "blow-up check off")


def last_checkpoint_text(run_dir: Path) -> str:
    from onecard.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    return (f"The last checkpoint, {latest}, is kept." if latest is not None
            else "No checkpoint had been written yet.")


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def out_of_memory(exc: BaseException, recipe: Recipe, step: int, device: str, where: str = "at") -> UserError:
    """The clean stop for an OOM at 0-based ``step`` (``where``: "at", or "in the eval after" for the work between
    steps): planned vs measured memory, and the cheapest fix."""
    from onecard.train.metrics import peak_memory_bytes

    measured, kind = peak_memory_bytes(device)
    capacity = _device_capacity_bytes(device)
    of = f" of {capacity / 2**30:.1f} GiB" if capacity else ""
    planned, fix = _plan_and_fix(recipe)
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
    return UserError(f"out of memory {where} step {step + 1} ({first_line[:160]}); planned {planned}, measured peak "
                     f"{measured / 2**30:.2f} GiB{of} ({kind}). {last_checkpoint_text(recipe.run_dir)}",
                     where=str(recipe.run_dir), fix=fix)


def _device_capacity_bytes(device: str) -> int | None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return None


def _plan_and_fix(recipe: Recipe) -> tuple[str, str]:
    """("X GiB on <gpu> (estimated)", the cheapest planned change that lowers memory, as --set flags)."""
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import plan_memory
    from onecard.plan.suggest import cheapest_reduction

    try:
        plan = plan_memory(inputs_from_recipe(recipe))
    except Exception as exc:  # noqa: BLE001 - the planner is advice; its failure must not hide the OOM
        return f"unknown (the planner failed: {type(exc).__name__})", "lower training.micro_batch_size or data.seq_len"
    planned = f"{plan.required_bytes / 2**30:.2f} GiB on {recipe.plan.gpu} (estimated)"
    best = cheapest_reduction(plan)
    if best is None:
        return planned, "lower data.seq_len, or train on a card with more memory"
    sets = " ".join(f"--set {k}={v}" for k, v in best.set.items())
    return planned, (f"{best.change}: {sets} (planned {best.total_bytes / 2**30:.2f} GiB), then the same command "
                     "with --resume --allow-recipe-change")
