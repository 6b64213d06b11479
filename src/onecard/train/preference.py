"""The DPO / KTO recipe: seed -> model -> reference -> data -> optimizer -> loop -> eval -> save.

Own loop rather than trl's ``DPOTrainer`` / ``KTOTrainer`` (trl 1.16.0 read for this choice):
- the GPU image has no trl (nor ``datasets``, which both trainers build their data with);
- the SFT spine (train/loop.py, checkpoint.py) already gives atomic checkpoints with every RNG state and the
  position inside the epoch, so a killed run resumes bit-identically; trl's resume goes through Trainer's
  data-loader state, which is not exact mid-epoch;
- the reference with a continued adapter must be the *starting* adapter loaded a second time, frozen; trl does
  the same (``ref`` adapter) but only when handed a PeftModel it prepared itself;
- the loss formulas are a few lines, restated with the trl source they mirror in train/preference_loss.py.
What is reused: model loading, optimizer and LR schedule, checkpoints, metrics files, run-directory handling,
``Schedule`` (example order and accumulation windows) and ``finish`` from the SFT loop.
"""

from __future__ import annotations

import time
from typing import Any

from onecard.errors import UserError
from onecard.recipe import Recipe


def train_preference(recipe: Recipe, resume: bool = False, console=None, overwrite: bool = False) -> dict[str, Any]:
    """Run a ``task: dpo | kto`` recipe; returns the summary also written to ``summary.json``."""
    return train_preference_model(recipe, resume=resume, console=console, overwrite=overwrite)[2]


def train_preference_model(recipe: Recipe, resume: bool = False, console=None, overwrite: bool = False):
    """:func:`train_preference`, also handing back the trained model and tokenizer: (model, tokenizer, summary)."""
    from onecard.data.preference import build_preference_dataset
    from onecard.train.loop import Schedule, lint_or_stop, seed_everything, start_run
    from onecard.train.model import load_model_and_tokenizer, resolve_device
    from onecard.train.preference_reference import setup_reference
    from onecard.train.preflight import say_before_training
    from onecard.train.rundir import check_run_dir

    run_dir = recipe.run_dir
    check_run_dir(run_dir, resume, overwrite)
    lint_or_stop(recipe, console)
    check_preference_recipe(recipe)
    _say_no_kernels(recipe, console)
    device = resolve_device(None)
    seed_everything(recipe.training.seed)
    model, tokenizer = load_model_and_tokenizer(recipe, device)
    reference = setup_reference(model, recipe)  # the starting model: before any step or restored checkpoint
    dataset = build_preference_dataset(recipe, tokenizer, split="train")
    eval_set = build_preference_dataset(recipe, tokenizer, split="eval")
    schedule = Schedule.from_recipe(recipe, len(dataset.examples))
    say_before_training(recipe, schedule, dataset.stats, console)  # preflight: schedule, truncated lines
    # after setup_reference: the optimizer sees the trained weights only
    optimizer, state = start_run(model, recipe, device, resume, overwrite, console)
    started = state.global_step
    state, timing = run_preference_steps(model, reference, tokenizer, optimizer, dataset, schedule, state, recipe,
                                         device, console)
    summary_extra = _final_metrics(state.metrics)
    if eval_set.examples:
        from onecard.data import pad_token_id
        from onecard.train.preference_step import evaluate_preferences

        summary_extra.update(evaluate_preferences(model, reference, eval_set, recipe, device, pad_token_id(tokenizer)))
    reference.release()  # the saved adapter/ holds only the trained adapter
    summary = _finish(run_dir, recipe, model, tokenizer, state, timing, dataset, device, started, summary_extra)
    model.eval()
    return model, tokenizer, summary


def check_preference_recipe(recipe: Recipe) -> None:
    """Refusals that need the recipe only (before the model is loaded)."""
    from onecard.train.preference_reference import resolve_reference

    resolve_reference(recipe)
    t = recipe.training
    if t.num_gpus > 1:
        raise UserError(f"task {recipe.task} runs on one GPU only for now", where="training.num_gpus",
                        fix="set training.num_gpus=1 (or drop --num-gpus)")
    if recipe.task == "kto" and t.micro_batch_size * t.grad_accum < 2:
        raise UserError("KTO estimates its KL reference point from mismatched (prompt, completion) pairs of one "
                        "optimizer step; with 1 example per step there is nothing to mismatch",
                        where="training.grad_accum",
                        fix="use at least 2 examples per step (micro_batch_size x grad_accum >= 2), e.g. "
                        "--set training.grad_accum=8")


def _say_no_kernels(recipe: Recipe, console) -> None:
    """Preference steps run on plain transformers modules: the fused linear-CE kernel returns a loss, not the
    per-sequence log-probs DPO/KTO need, and the LoRA-aware fused MLP has not been checked against
    ``disable_adapter`` / ``set_adapter`` switching, which the reference relies on."""
    if recipe.training.kernels in ("onecard", "liger") and console is not None:
        console.print(f"[yellow]training.kernels {recipe.training.kernels!r} is not used for task {recipe.task}: "
                      "preference steps run on plain transformers modules[/yellow]")


def run_preference_steps(model, reference, tokenizer, optimizer, dataset, schedule, state, recipe: Recipe,
                         device: str, console):
    """The optimisation loop (the SFT loop's structure, with the DPO/KTO step); returns (state, timing)."""
    import torch

    from onecard.data import epoch_order, pad_token_id
    from onecard.train.loop import Rate, _checkpoint_if_due, _clip, account_step
    from onecard.train.metrics import MetricsLogger, TrainProgress
    from onecard.train.optim import set_lr
    from onecard.train.preference_step import dpo_step, kto_step
    from onecard.train.guards import StepGuard
    from onecard.train.save_policy import SaveClock
    from onecard.train.signals import StopSignals

    t = recipe.training
    step_fn = dpo_step if recipe.task == "dpo" else kto_step
    params = [p for p in model.parameters() if p.requires_grad]
    logger = MetricsLogger(recipe.run_dir, state.metrics)
    progress = TrainProgress(console, schedule.total_steps, state.global_step)
    orders: dict[int, list[int]] = {}
    pad_id = pad_token_id(tokenizer)
    rate = Rate()
    guard, clock, stop = StepGuard(recipe), SaveClock(recipe), StopSignals(console).install()  # guards, signals
    model.train()
    try:
        while state.global_step < schedule.total_steps:
            state.epoch, state.step_in_epoch = divmod(state.global_step, schedule.steps_per_epoch)
            if state.epoch not in orders:
                orders = {state.epoch: epoch_order(schedule.n_examples, t.seed, state.epoch, shuffle=recipe.data.shuffle)}
            micro = [[dataset.examples[i] for i in idx] for idx in schedule.window(orders[state.epoch],
                                                                                   state.step_in_epoch)]
            lr = set_lr(optimizer, recipe, state.global_step, schedule.total_steps)
            metrics = step_fn(model, reference, micro, recipe, device, pad_id)
            grad_norm = _clip(params, t.max_grad_norm)
            guard.check(state.global_step, metrics["loss"], grad_norm)  # guards: before the step is applied
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record = {**metrics, "lr": lr, "grad_norm": grad_norm}
            account_step(state, record, schedule, recipe, rate, device, logger)
            progress.update(state.global_step, metrics["loss"], record["tokens_per_s"], record["peak_memory_bytes"],
                            progress_text(metrics))
            _checkpoint_if_due(model, optimizer, state, schedule, recipe, logger, clock, stop, console)
    finally:
        stop.uninstall()
        progress.close()
        logger.close()
    state.metrics = list(logger.records)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return state, {"seconds": time.perf_counter() - rate.start, "tokens": rate.tokens}


_SUMMARY_KEYS = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "reward_desirable",
                 "reward_undesirable", "kl")


def _final_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    last = records[-1] if records else {}
    return {f"final_{k}": last[k] for k in _SUMMARY_KEYS if k in last}


def _finish(run_dir, recipe, model, tokenizer, state, timing, dataset, device, started, extra: dict[str, Any]):
    """The SFT loop's ``finish`` (weights, then summary.json), with the preference numbers added to the summary."""
    from onecard.train.summary import finish

    extra = {**extra, "kernels": "none", "beta": recipe.preference.beta,
             "loss_type": recipe.preference.loss_type if recipe.task == "dpo" else "kto"}
    return finish(run_dir, recipe, model, tokenizer, state, timing, dataset, device, started, extra=extra)


def progress_text(metrics: dict[str, Any]) -> str:
    """What the progress bar shows beside the loss: reward accuracy and margin (KTO: KL)."""
    text = f"acc {metrics['reward_accuracy']:.2f}"
    if "reward_margin" in metrics:
        text += f" margin {metrics['reward_margin']:+.3f}"
    if "kl" in metrics:
        text += f" kl {metrics['kl']:.3f}"
    return text
