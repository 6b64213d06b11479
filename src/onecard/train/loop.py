"""The SFT / continued pre-training recipe: seed -> model -> data -> optimizer -> loop -> save.

An own loop rather than ``transformers.Trainer``, for two properties the tests pin down:
- the loss under gradient accumulation is the summed token cross-entropy of the whole accumulation window
  divided by the window's count of trained tokens, so micro-batch 1 x accumulation 4 gives the same gradient
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


def train(recipe: Recipe, resume: bool = False, console=None, overwrite: bool = False,
          allow_recipe_change: bool = False) -> dict[str, Any]:
    """Run the recipe; returns the summary also written to ``summary.json``."""
    return train_model(recipe, resume=resume, console=console, overwrite=overwrite,
                       allow_recipe_change=allow_recipe_change)[2]


def train_model(recipe: Recipe, resume: bool = False, console=None, overwrite: bool = False,
                allow_recipe_change: bool = False):
    """:func:`train`, also handing back the trained model and tokenizer in memory: (model, tokenizer, summary).

    ``--resume`` on a finished run changes nothing and returns (None, None, its stored summary).
    """
    from onecard.train.resume_policy import check_resume

    if (done := check_resume(recipe, resume, allow_recipe_change)) is not None:  # resume policy: finished run
        return None, None, {**done, "already_finished": True}
    if recipe.task in ("dpo", "kto"):  # preference tuning: own step and reference policy, same spine
        from onecard.train.preference import train_preference_model

        return train_preference_model(recipe, resume=resume, console=console, overwrite=overwrite)
    from onecard.train.distributed import is_worker

    if is_worker():  # one of the N processes of onecard train --num-gpus N: same spine, per rank
        from onecard.train.distributed_loop import train_distributed_model

        return train_distributed_model(recipe, resume=resume, console=console, overwrite=overwrite)
    from onecard.data import build_dataset
    from onecard.train.model import load_model_and_tokenizer, resolve_device
    from onecard.train.preflight import say_before_training
    from onecard.train.rundir import check_run_dir
    from onecard.train.summary import evaluate_and_save, finish, has_eval_data, reset_peak_after_setup

    run_dir = recipe.run_dir
    check_run_dir(run_dir, resume, overwrite)
    if resume:
        from onecard.train.distributed_loop import check_resume_world

        check_resume_world(run_dir, 1)  # a checkpoint written by N processes resumes on N
    lint_or_stop(recipe, console)
    device = resolve_device(None)
    seed_everything(recipe.training.seed)
    model, tokenizer = load_model_and_tokenizer(recipe, device)
    kernels = apply_recipe_kernels(model, recipe, device, console)
    dataset = build_dataset(recipe, tokenizer, split="train")
    schedule = Schedule.from_recipe(recipe, len(dataset.examples))
    say_before_training(recipe, schedule, dataset.stats, console)  # preflight: schedule, truncated lines
    optimizer, state = start_run(model, recipe, device, resume, overwrite, console)
    started = state.global_step
    setup = reset_peak_after_setup(device)
    from onecard.patch import blocks as split_blocks

    varlen_before, split_before = kernels.varlen_calls(), split_blocks.CALLS["split"]
    state, timing = run_steps(model, tokenizer, optimizer, dataset, schedule, state, recipe, device, console,
                              fused_loss=kernels.fused_loss)
    ran = {"kernels_patched": kernels.patched(), "varlen_attention_calls": kernels.varlen_calls() - varlen_before,
           "split_checkpoint_calls": split_blocks.CALLS["split"] - split_before}
    kernels.revert()  # the saved adapter/model and any later eval see plain transformers modules
    summary = finish(run_dir, recipe, model, tokenizer, state, timing, dataset, device, started,
                     extra={"kernels": kernels.name, **ran, **setup})
    if recipe.eval.at_end and has_eval_data(recipe):
        summary["eval"] = evaluate_and_save(model, tokenizer, recipe, summary)
    model.eval()
    return model, tokenizer, summary


# --------------------------------------------------------------------------- the pieces, in order


def lint_or_stop(recipe: Recipe, console=None) -> None:
    """Stop on pre-flight errors from ``onecard.lint`` when that module exists (it is built separately).

    A crash *inside* lint (a bug there, not the user's) is reported and training goes on: lint is advice.
    """
    try:
        from onecard.lint import lint_recipe
    except ImportError:
        return
    try:
        findings = lint_recipe(recipe)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - see docstring
        if console is not None:
            console.print(f"[yellow]lint skipped: it failed with {type(exc).__name__}: {exc}[/yellow]")
        return
    errors = [f for f in findings if getattr(f, "severity", None) == "error"]
    if errors:
        first = errors[0]
        what = getattr(first, "message", None) or getattr(first, "why", None) or str(first)
        more = f" (and {len(errors) - 1} more lint error(s); run onecard lint)" if len(errors) > 1 else ""
        raise UserError(f"lint {getattr(first, 'id', '')}: {what}{more}".replace("lint : ", "lint: "),
                        where=getattr(first, "where", None), fix=getattr(first, "fix", None))


@dataclass
class AppliedKernels:
    name: str          # what ran: "onecard", "liger" or "none"
    fused_loss: bool   # the causal-LM forward returns the fused linear-CE loss (no full logits)
    handle: Any = None

    def revert(self) -> None:
        if self.handle is not None:
            self.handle.revert()

    def patched(self) -> dict[str, int]:
        """What the kernels replaced, module kind -> count (empty after revert)."""
        return dict(self.handle.patched) if self.handle is not None else {}

    def varlen_calls(self) -> int:
        """Attention calls so far that packed rows sent through varlen_attn (onecard's attention only)."""
        if self.name != "onecard":
            return 0
        from onecard.patch import packed

        return packed.varlen_calls


def resolve_kernels(recipe: Recipe, device: str) -> str:
    """``kernels: auto`` means onecard's fused kernels on CUDA and plain transformers elsewhere."""
    choice = recipe.training.kernels
    if choice == "auto":
        return "onecard" if device.startswith("cuda") else "none"
    return choice


def apply_recipe_kernels(model, recipe: Recipe, device: str, console=None) -> AppliedKernels:
    """Patch the model instance with the recipe's kernels (onecard.patch); ``fused_ce`` can turn the loss off."""
    name = resolve_kernels(recipe, device)
    if name == "none":
        return AppliedKernels("none", False)
    from onecard.patch import apply_kernels

    fused_ce = recipe.training.fused_ce
    handle = apply_kernels(model, name, fused_loss=fused_ce in ("auto", True))
    if handle.notice and console is not None:
        console.print(f"[yellow]{handle.notice}[/yellow]")
    return AppliedKernels(name if handle.active else "none", "fused_linear_ce" in handle.patched, handle)


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)  # python, numpy, torch CPU and CUDA


@dataclass(frozen=True)
class Schedule:
    """How examples map to optimizer steps: each step consumes ``examples_per_step`` examples in epoch order."""

    n_examples: int
    micro_batch_size: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def from_recipe(cls, recipe: Recipe, n_examples: int) -> "Schedule":
        t = recipe.training
        if n_examples == 0:
            raise UserError("no training examples left after loading", where=f"data.path: {recipe.data.path}")
        per_step = t.micro_batch_size * t.grad_accum
        steps_per_epoch = math.ceil(n_examples / per_step)
        total = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))
        return cls(n_examples, t.micro_batch_size, t.grad_accum, steps_per_epoch, total)

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
        record_resume(run_dir, recipe, console)  # resume policy: old recipe kept, resumes.jsonl, before rewrite
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


def token_ce_sum(logits, labels):
    """Summed next-token cross-entropy over trained positions (labels -100 are skipped), and their count."""
    import torch.nn.functional as F

    # Shift the labels, not the logits: logits[:, :-1] is a strided view, so its fp32 upcast and reshape
    # would hold one more batch x seq x vocab block; an fp32 upcast of contiguous logits reshapes as a view.
    shift_labels = F.pad(labels.to(logits.device), (0, 1), value=-100)[:, 1:]
    flat_logits = logits.float().reshape(-1, logits.size(-1))
    loss_sum = F.cross_entropy(flat_logits, shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss_sum, int((shift_labels != -100).sum())


def trained_tokens(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def accumulate_gradients(model, micro_batches: list[dict[str, Any]], device: str,
                         fused_loss: bool = False) -> tuple[float, int]:
    """Backward over one accumulation window, each micro-batch's summed loss divided by the window's token count.

    Returns (window loss = summed CE / trained tokens, trained tokens). The gradient equals that of one
    big batch holding every example of the window, whatever the micro-batch split. With ``fused_loss`` the
    patched model computes the same quantity itself (``num_items_in_batch`` = the window's token count)
    without materialising the logits. Inputs come from ``onecard.data.model_inputs``: packed rows go
    without the 2-D mask so that transformers keeps packed examples apart.
    """
    from onecard.data import model_inputs

    window_tokens = max(1, sum(trained_tokens(b) for b in micro_batches))
    total = 0.0
    for batch in micro_batches:
        inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in model_inputs(batch).items()}
        inputs.setdefault("use_cache", False)
        if fused_loss:
            loss = model(**inputs, labels=batch["labels"].to(device), num_items_in_batch=window_tokens).loss
            loss.backward()
            total += float(loss.detach()) * window_tokens
            continue
        logits = model(**inputs).logits
        loss_sum, _ = token_ce_sum(logits, batch["labels"])
        del logits  # not kept alive through backward (notes/bench.md: ~3.9 GiB at Llama 3 8B, b8, seq 2048)
        (loss_sum / window_tokens).backward()
        total += float(loss_sum.detach())
    return total / window_tokens, window_tokens


def run_steps(model, tokenizer, optimizer, dataset, schedule: Schedule, state, recipe: Recipe, device: str, console,
              fused_loss: bool = False):
    """The optimisation loop; checkpoints as train/save_policy.py says and on SIGINT/SIGTERM; returns (state, timing).

    A NaN/inf or blown-up step, an out-of-memory error or a full disk stops it cleanly (train/guards.py).
    """
    import torch

    from onecard.data import pad_token_id
    from onecard.train.guards import StepGuard, is_out_of_memory, out_of_memory
    from onecard.train.metrics import MetricsLogger, TrainProgress
    from onecard.train.save_policy import SaveClock
    from onecard.train.signals import StopSignals
    from onecard.train.summary import eval_if_due

    logger = MetricsLogger(recipe.run_dir, state.metrics)
    progress = TrainProgress(console, schedule.total_steps, state.global_step)
    batches = _Batches(dataset, schedule, recipe, pad_token_id(tokenizer))
    rate, steady = Rate(), None
    guard, clock, stop = StepGuard(recipe), SaveClock(recipe), StopSignals(console).install()  # guards, signals
    model.train()
    try:
        while state.global_step < schedule.total_steps:
            micro = batches.window(state.global_step)
            try:
                record = optimizer_step(model, optimizer, micro, recipe, state.global_step, schedule.total_steps,
                                        device, fused_loss, guard=guard)
            except Exception as exc:  # guards: out-of-memory becomes a clean stop with the plan beside it
                if not is_out_of_memory(exc):
                    raise
                optimizer.zero_grad(set_to_none=True)
                raise out_of_memory(exc, recipe, state.global_step, device) from None
            account_step(state, record, schedule, recipe, rate, device, logger)
            progress.update(state.global_step, record["loss"], record["tokens_per_s"], record["peak_memory_bytes"])
            eval_if_due(model, tokenizer, recipe, state.global_step, logger)
            if steady is None:  # the first step pays compilation and warm-up: the steady rate starts after it
                steady = (time.perf_counter(), rate.tokens)
            _checkpoint_if_due(model, optimizer, state, schedule, recipe, logger, clock, stop, console)
    finally:
        stop.uninstall()
        progress.close()
        logger.close()
    state.metrics = list(logger.records)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    end = time.perf_counter()
    timing = {"seconds": end - rate.start, "tokens": rate.tokens}
    if steady is not None and rate.tokens > steady[1]:
        timing.update(steady_seconds=end - steady[0], steady_tokens=rate.tokens - steady[1])
    return state, timing


@dataclass
class Rate:
    """Tokens processed by this process since it started the loop (a resumed run counts from its restart)."""

    start: float = field(default_factory=time.perf_counter)
    tokens: int = 0

    def add(self, tokens: int) -> float:
        self.tokens += tokens
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


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


class _Batches:
    """Micro-batches of a global step: epoch order from (seed, epoch), position from the step (resume-exact)."""

    def __init__(self, dataset, schedule: Schedule, recipe: Recipe, pad_id: int):
        self.dataset, self.schedule, self.recipe, self.pad_id = dataset, schedule, recipe, pad_id
        self._order: tuple[int, list[int]] | None = None

    def window(self, global_step: int) -> list[dict[str, Any]]:
        from onecard.data import collate, epoch_order

        epoch, position = divmod(global_step, self.schedule.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            order = epoch_order(self.schedule.n_examples, self.recipe.training.seed, epoch,
                                shuffle=self.recipe.data.shuffle)
            self._order = (epoch, order)
        return [collate([self.dataset.examples[i] for i in idx], self.pad_id)
                for idx in self.schedule.window(self._order[1], position)]


def optimizer_step(model, optimizer, micro, recipe: Recipe, step: int, total_steps: int, device: str,
                   fused_loss: bool = False, guard=None) -> dict:
    """Set the LR, accumulate over the window, clip, check (``guard``: train/guards.StepGuard), step.

    Returns the step's metrics."""
    from onecard.train.optim import set_lr

    lr = set_lr(optimizer, recipe, step, total_steps)
    loss, n_trained = accumulate_gradients(model, micro, device, fused_loss)
    grad_norm = _clip([p for p in model.parameters() if p.requires_grad], recipe.training.max_grad_norm)
    if guard is not None:
        guard.check(step, loss, grad_norm)  # guards: before optimizer.step, so a bad step is never applied
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens, "trained_tokens": n_trained}


def _checkpoint_if_due(model, optimizer, state, schedule: Schedule, recipe: Recipe, logger, clock=None, stop=None,
                       console=None) -> None:
    """Save when ``clock`` (save_policy.SaveClock; None: the step interval only) says so or a signal asked
    (``stop``: signals.StopSignals), then stop with RunInterrupted if it did."""
    from onecard.train.save_policy import save_or_stop

    stopping = stop is not None and stop.requested
    every = recipe.training.save_every_steps
    due = clock.due(state.global_step) if clock is not None else bool(every) and state.global_step % every == 0
    if not (due or stopping):
        return
    state.epoch, state.step_in_epoch = divmod(state.global_step, schedule.steps_per_epoch)
    state.metrics = list(logger.records)
    path = save_or_stop(recipe.run_dir, model, optimizer, state, {"kind": recipe.training.lr_scheduler,
                                                                   "step": state.global_step}, console)
    if clock is not None:
        clock.saved()
    if int(os.environ.get(CRASH_ENV, "0") or 0) == state.global_step:
        os._exit(17)  # simulate a killed process (tests only): no cleanup, no flush
    if stop is not None and stop.requested:  # also a signal that arrived during this very save
        raise stop.interrupted(state.global_step, path)


def _clip(params, max_grad_norm: float | None) -> float | None:
    import torch

    if max_grad_norm is None:  # no clipping, but the norm is still logged and checked (train/guards.py)
        return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
