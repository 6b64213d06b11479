"""The training spine every task and strategy shares: setup pieces and the one step loop.

A task (SFT/pretrain, DPO/KTO) or strategy (several GPUs) supplies a :class:`Step`: its batch-to-loss backward
over one accumulation window, its gradient clipping and its checkpoint. Everything else is here, once: the
epoch order, the LR schedule, the optimizer step, counting, logging, progress, checkpoint timing, timing.

Two properties the tests pin down, and why the loop is onecard's own rather than ``transformers.Trainer``:
- the loss under gradient accumulation is the summed loss of the whole accumulation window divided by the
  window's count (trained tokens, pairs or examples), so micro-batch 1 x accumulation 4 gives the same gradient
  as micro-batch 4 x accumulation 1 (averaging per-micro-batch means does not, see tests/test_train_accum.py);
- mid-epoch resume is exact: the data order is a pure function of (seed, epoch), the position inside the
  epoch and every RNG state are checkpointed, so a killed-and-resumed run ends with the same weights.
Both are hard to guarantee through Trainer's callbacks and data-loader state across its versions.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onecard.errors import UserError
from onecard.recipe import Recipe

CRASH_ENV = "ONECARD_TEST_CRASH_AT_STEP"  # test hook: os._exit right after the checkpoint of this step


# --------------------------------------------------------------------------- setup, in order


def lint_or_stop(recipe: Recipe, console=None, device: str | None = None) -> None:
    """Stop on pre-flight errors from ``onecard.lint`` (the first one, with a count of the rest).

    ``device`` is the one training runs on: a CPU run is not held to a GPU's memory, a CUDA run to the card in
    the machine (its catalog row) rather than ``plan.gpu``. Rules named in ``lint.ignore`` (``onecard train
    --ignore-lint ID``) are printed and do not stop the run. A crash *inside* lint (a bug there, not the user's)
    is reported and training goes on: lint is advice.
    """
    from onecard.lint import lint_recipe

    try:
        findings = lint_recipe(recipe, device=lint_device(device))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - see docstring
        if console is not None:
            console.print(f"[yellow]lint skipped: it failed with {type(exc).__name__}: {exc}[/yellow]")
        return
    ignored = set(recipe.lint.ignore)
    if console is not None:
        from rich.text import Text

        for f in findings:
            if f.severity == "info":
                console.print(Text(f"lint [{f.id}]: {f.message}", style="dim"))
            elif f.severity == "error" and f.id in ignored:
                console.print(Text(f"lint error ignored (lint.ignore): [{f.id}] {f.message}", style="yellow"))
    errors = [f for f in findings if f.severity == "error" and f.id not in ignored]
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more lint error(s); run onecard lint)" if len(errors) > 1 else ""
        raise UserError(f"lint {first.id}: {first.message}{more}", where=first.where,
                        fix=f"{first.fix}; or, to train anyway: onecard train ... --ignore-lint {first.id}")


def lint_device(device: str | None) -> str | None:
    """What lint checks a run on ``device`` against: "cpu", the catalog id of this CUDA card, or None (plan.gpu:
    a card the catalog does not list)."""
    if device is None:
        return None
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    from onecard.catalog.gpus import match_device_name

    index = torch.device(device).index
    gpu = match_device_name(torch.cuda.get_device_name(index or 0))
    return gpu.id if gpu else None


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy, torch CPU and CUDA. ``deterministic`` (``training.deterministic``): also deterministic
    torch algorithms, cuBLAS workspace and cuDNN, as transformers' ``enable_full_determinism`` sets them: on CUDA
    the attention backward and some reductions otherwise accumulate in a run-dependent order, so two runs -- or a
    run and its resume -- drift apart at rounding level from the second step on. Not ``enable_full_determinism``
    itself: it also sets CUDA_LAUNCH_BLOCKING=1 (needed only before CUDA 10.2), which would serialise the copy
    streams that weight streaming and offloaded checkpoints overlap with compute."""
    import os

    from transformers import set_seed

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when the cuBLAS handle is made
        os.environ.setdefault("FLASH_ATTENTION_DETERMINISTIC", "1")
    set_seed(seed, deterministic=deterministic)  # + torch.use_deterministic_algorithms(True)
    if deterministic:
        import torch

        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


@dataclass(frozen=True)
class Schedule:
    """How examples map to optimizer steps: each step consumes ``examples_per_step`` examples in epoch order."""

    n_examples: int
    micro_batch_size: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def from_recipe(cls, recipe: Recipe, n_examples: int, world: int = 1) -> "Schedule":
        """``world`` processes: micro-batch sets of ``micro_batch_size x world`` (the global batch)."""
        t = recipe.training
        if n_examples == 0:
            raise UserError("no training examples left after loading", where=f"data.path: {recipe.data.path}")
        per_step = t.micro_batch_size * world * t.grad_accum
        steps_per_epoch = math.ceil(n_examples / per_step)
        total = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))
        return cls(n_examples, t.micro_batch_size * world, t.grad_accum, steps_per_epoch, total)

    def window(self, order: list[int], step_in_epoch: int) -> list[list[int]]:
        """Example indices of one optimizer step, split into micro-batches (the epoch's last may be short)."""
        per_step = self.micro_batch_size * self.grad_accum
        chosen = order[step_in_epoch * per_step:(step_in_epoch + 1) * per_step]
        return [chosen[i:i + self.micro_batch_size] for i in range(0, len(chosen), self.micro_batch_size)]


def start_run(model, recipe: Recipe, device: str, resume: bool, overwrite: bool, console=None):
    """Once model and data have loaded: write the run directory, checkpointing, optimizer, restored state.

    Returns (optimizer, state). Build the optimizer only after everything that decides which weights train.
    """
    from onecard.train.checkpoint import TrainState
    from onecard.train.model import enable_grad_ckpt
    from onecard.train.optim import build_optimizer
    from onecard.train.resume_policy import record_resume
    from onecard.train.rundir import prepare_run_dir

    run_dir = recipe.run_dir
    if resume:
        record_resume(run_dir, recipe, console)  # the old recipe kept, resumes.jsonl, before recipe.yaml is rewritten
    prepare_run_dir(run_dir, recipe, overwrite)  # only now: bad input leaves nothing half-written
    if recipe.training.grad_ckpt:
        enable_grad_ckpt(model, recipe)
    optimizer = build_optimizer(model, recipe, device, console)
    state = restore(run_dir, model, optimizer) if resume else TrainState()
    return optimizer, state


def restore(run_dir: Path, model, optimizer):
    from onecard.train.checkpoint import load_latest, load_trainable, set_rng_state

    ckpt = load_latest(run_dir)
    if ckpt is None:  # check_run_dir already verified one exists; a race with deletion lands here
        raise UserError("no checkpoint to resume from", where=str(run_dir))
    load_trainable(model, ckpt["trainable"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])  # last: nothing after this may draw random numbers before the next step
    return ckpt["state"]


# --------------------------------------------------------------------------- what a task supplies


class Step:
    """One task's (or strategy's) part of an optimizer step. ``backward(window)`` gets the example indices of one
    accumulation window (one list per micro-batch), runs the backward passes and returns the step's metrics:
    ``loss``, ``tokens``, ``trained_tokens`` and any task metrics. ``logs``: this process writes metrics.
    ``one_process``: the step's process decides alone when to save (save every N minutes, save on SIGINT/SIGTERM);
    N processes would each decide at a different step, so a multi-GPU rank saves by step interval only."""

    logs = True
    one_process = True

    def __init__(self, model, optimizer, recipe: Recipe, device: str):
        self.model, self.optimizer, self.recipe, self.device = model, optimizer, recipe, device

    def backward(self, window: list[list[int]]) -> dict[str, Any]:
        raise NotImplementedError

    def zero_grad(self) -> None:
        """After each optimizer step: the gradients are freed until the next backward."""
        self.optimizer.zero_grad(set_to_none=True)

    def clip(self, max_grad_norm: float | None) -> float | None:
        import torch

        params = [p for p in self.model.parameters() if p.requires_grad]
        if max_grad_norm is None:  # no clipping, but the norm is still logged and checked (train/guards.py)
            return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))

    def save(self, state) -> Path:
        from onecard.train.checkpoint import save_checkpoint

        return save_checkpoint(self.recipe.run_dir, self.model, self.optimizer, state,
                        {"kind": self.recipe.training.lr_scheduler, "step": state.global_step})

    def after_step(self, step: int, logger) -> None:
        """Work between steps (SFT: the held-out eval when due)."""

    def progress_text(self, record: dict[str, Any]) -> str:
        """What the progress bar shows beside the loss."""
        return ""


# --------------------------------------------------------------------------- the loop


@dataclass
class Rate:
    """Tokens processed by this process since it started the loop (a resumed run counts from its restart)."""

    start: float = field(default_factory=time.perf_counter)
    tokens: int = 0

    def add(self, tokens: int) -> float:
        self.tokens += tokens
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


def run_steps(step: Step, schedule: Schedule, state, console):
    """The optimisation loop: every task's and strategy's. Returns (state, timing).

    Checkpoints as train/save_policy.py says and, in one process, on SIGINT/SIGTERM (train/signals.py). A NaN/inf
    or blown-up step, an out-of-memory error or a full disk stops it cleanly (train/guards.py)."""
    import torch

    from onecard.data import epoch_order
    from onecard.train.guards import StepGuard, is_out_of_memory, out_of_memory
    from onecard.train.host_gc import freeze_startup_objects, unfreeze
    from onecard.train.metrics import MetricsLogger, TrainProgress
    from onecard.train.save_policy import SaveClock
    from onecard.train.signals import RunInterrupted, StopSignals
    from onecard.train.sinks import Sinks

    recipe, model = step.recipe, step.model
    logger = MetricsLogger(recipe.run_dir, state.metrics, Sinks(recipe, state.metrics, console)) if step.logs else None
    progress = TrainProgress(console, schedule.total_steps, state.global_step)
    order: tuple[int, list[int]] = (-1, [])
    rate, steady = Rate(), None
    guard = StepGuard(recipe)
    clock, stop = (SaveClock(recipe), StopSignals(console).install()) if step.one_process else (None, None)
    model.train()
    outcome = "failed"  # what the sinks record if the loop raises
    freeze_startup_objects()  # full collections would walk the whole model (train/host_gc.py)
    try:
        while state.global_step < schedule.total_steps:
            epoch, position = divmod(state.global_step, schedule.steps_per_epoch)
            if order[0] != epoch:  # the order is a pure function of (seed, epoch): resume-exact
                order = (epoch, epoch_order(schedule.n_examples, recipe.training.seed, epoch,
                                            shuffle=recipe.data.shuffle))
            try:
                record = optimizer_step(step, schedule.window(order[1], position), state.global_step,
                                        schedule.total_steps, guard)
            except Exception as exc:  # out-of-memory becomes a clean stop with the plan beside it
                if not is_out_of_memory(exc):
                    raise
                step.zero_grad()
                raise out_of_memory(exc, recipe, state.global_step, step.device) from None
            account_step(state, record, schedule, recipe, rate, step.device, logger)
            progress.update(state.global_step, record["loss"], record["tokens_per_s"], record["peak_memory_bytes"],
                            step.progress_text(record))
            try:
                step.after_step(state.global_step, logger)
            except Exception as exc:  # the eval between steps ran out of memory: the same clean stop
                if not is_out_of_memory(exc):
                    raise
                raise stop_after_eval_oom(exc, step, state, schedule, logger, console) from None
            if steady is None:  # the first step pays compilation and warm-up: the steady rate starts after it
                steady = (time.perf_counter(), rate.tokens)
            checkpoint_if_due(step, state, schedule, logger, clock, stop, console)
        outcome = "finished"
    except (RunInterrupted, KeyboardInterrupt):
        outcome = "killed"
        raise
    finally:
        unfreeze()
        if stop is not None:
            stop.uninstall()
        progress.close()
        if logger is not None:
            logger.close(outcome)
    state.metrics = list(logger.records) if logger is not None else []
    if step.device.startswith("cuda"):
        torch.cuda.synchronize()
    end = time.perf_counter()
    timing = {"seconds": end - rate.start, "tokens": rate.tokens}
    if steady is not None and rate.tokens > steady[1]:
        timing.update(steady_seconds=end - steady[0], steady_tokens=rate.tokens - steady[1])
    return state, timing


def optimizer_step(step: Step, window: list[list[int]], global_step: int, total_steps: int, guard=None) -> dict[str, Any]:
    """Set the LR, the task's backward over the window, clip, check (``guard``: train/guards.StepGuard), step.
    Returns the step's record."""
    from onecard.train.optim import set_lr

    lr = set_lr(step.optimizer, step.recipe, global_step, total_steps)
    metrics = step.backward(window)
    grad_norm = step.clip(step.recipe.training.max_grad_norm)
    if guard is not None:
        guard.check(global_step, metrics["loss"], grad_norm)  # before optimizer.step: a bad step is never applied
    step.optimizer.step()
    step.zero_grad()
    return {"loss": metrics.pop("loss"), "lr": lr, "grad_norm": grad_norm, **metrics}


def account_step(state, record: dict, schedule: Schedule, recipe: Recipe, rate: Rate, device: str, logger) -> None:
    """Count a finished optimizer step into the run state, add its rate and peak memory to its record, log it.

    ``logger`` None: a rank other than 0 of a multi-GPU run, which keeps the state but writes nothing.
    """
    from onecard.train.metrics import peak_memory_bytes

    state.global_step += 1
    state.tokens_seen += record["tokens"]
    state.trained_tokens += record["trained_tokens"]
    record["tokens_per_s"] = rate.add(record["tokens"])
    record["peak_memory_bytes"], _ = peak_memory_bytes(device)
    if logger is not None and (state.global_step % recipe.training.log_every_steps == 0
                               or state.global_step == schedule.total_steps):
        logger.log({"step": state.global_step, "epoch": round(state.global_step / schedule.steps_per_epoch, 4),
                    **record})


def checkpoint_if_due(step: Step, state, schedule: Schedule, logger, clock=None, stop=None, console=None) -> None:
    """Save when ``clock`` (save_policy.SaveClock; None: the step interval only) says so or a signal asked
    (``stop``: signals.StopSignals), then stop with RunInterrupted if one did."""
    every = step.recipe.training.save_every_steps
    stopping = stop is not None and stop.requested
    due = clock.due(state.global_step) if clock is not None else bool(every) and state.global_step % every == 0
    if not (due or stopping):
        return
    path = save_now(step, state, schedule, logger, console)
    if clock is not None:
        clock.saved()
    if stop is not None and stop.requested:  # also a signal that arrived during this very save
        raise stop.interrupted(state.global_step, path)
    if int(os.environ.get(CRASH_ENV, "0") or 0) == state.global_step:
        os._exit(17)  # simulate a killed process (tests only): no cleanup, no flush; every rank alike


def save_now(step: Step, state, schedule: Schedule, logger, console=None) -> Path:
    """Checkpoint the state after ``state.global_step`` steps, with its place in the epoch and the metrics so far."""
    from onecard.train.save_policy import save_or_stop

    state.epoch, state.step_in_epoch = divmod(state.global_step, schedule.steps_per_epoch)
    if logger is not None:
        state.metrics = list(logger.records)
    return save_or_stop(step.recipe.run_dir, lambda: step.save(state), state.global_step, console)


def stop_after_eval_oom(exc: BaseException, step: Step, state, schedule: Schedule, logger, console) -> UserError:
    """The clean stop for an out-of-memory eval between steps. The step before it was applied and is good, so in
    one process it is checkpointed first and nothing trained is lost (``--resume`` goes on after it, without
    that eval). Several processes save together or not at all, so a multi-GPU rank keeps the last checkpoint."""
    import torch

    from onecard.train.guards import is_out_of_memory, out_of_memory

    exc.__traceback__ = None  # its frames hold the eval's activations: free them before the save needs memory
    if step.one_process:
        if step.device.startswith("cuda"):
            torch.cuda.empty_cache()
        try:
            save_now(step, state, schedule, logger, console)
        except Exception as save_exc:  # the card is still too full to stage the state: the last checkpoint stands
            if not is_out_of_memory(save_exc):
                raise
    return out_of_memory(exc, step.recipe, state.global_step - 1, step.device, where="in the eval after")
