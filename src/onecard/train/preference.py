"""The DPO / KTO recipe: seed -> model -> reference -> data -> optimizer -> loop -> eval -> save.

Own loop rather than trl's ``DPOTrainer`` / ``KTOTrainer`` (trl 1.16.0 read for this choice):
- the GPU image has no trl (nor ``datasets``, which both trainers build their data with);
- the spine (train/spine.py, checkpoint.py) already gives atomic checkpoints with every RNG state and the
  position inside the epoch, so a killed run resumes bit-identically; trl's resume goes through Trainer's
  data-loader state, which is not exact mid-epoch;
- the reference with a continued adapter must be the *starting* adapter loaded a second time, frozen; trl does
  the same (``ref`` adapter) but only when handed a PeftModel it prepared itself;
- the loss formulas are a few lines, restated with the trl source they mirror in train/preference_loss.py.
What it supplies to the spine (train/spine.py) is its step, :class:`PreferenceStep`; the rest is the spine's:
model loading, the step loop, optimizer and LR schedule, checkpoints, metrics, run-directory handling, ``finish``.
"""

from __future__ import annotations

from typing import Any

from onecard.errors import UserError
from onecard.recipe import Recipe
from onecard.train.spine import Schedule, Step, lint_or_stop, run_steps, seed_everything, start_run


def train_preference(recipe: Recipe, resume: bool = False, console=None, overwrite: bool = False) -> dict[str, Any]:
    """Run a ``task: dpo | kto`` recipe; returns the summary also written to ``summary.json``."""
    return train_preference_model(recipe, resume=resume, console=console, overwrite=overwrite)[2]


def train_preference_model(recipe: Recipe, resume: bool = False, console=None, overwrite: bool = False):
    """:func:`train_preference`, also handing back the trained model and tokenizer: (model, tokenizer, summary)."""
    from onecard.data import pad_token_id
    from onecard.data.preference import build_preference_dataset
    from onecard.train.model import load_model_and_tokenizer, resolve_device
    from onecard.train.preference_reference import setup_reference
    from onecard.train.preflight import say_before_training
    from onecard.train.rundir import check_run_dir

    run_dir = recipe.run_dir
    check_run_dir(run_dir, resume, overwrite)
    device = resolve_device(None)
    lint_or_stop(recipe, console, device=device)
    check_preference_recipe(recipe)
    _say_no_kernels(recipe, console)
    from onecard.train import stream_setup
    from onecard.train.memory_cap import apply_requested_cap

    seed_everything(recipe.training.seed, recipe.training.deterministic)  # before CUDA starts: cuBLAS's config
    apply_requested_cap(device, console)  # --memory-cap-gib: before anything is allocated on the card
    streaming = stream_setup.decide(recipe, device)  # training.offload_weights; host RAM checked before loading
    model, tokenizer = load_model_and_tokenizer(recipe, device, streaming.park_layers)
    reference = setup_reference(model, recipe)  # the starting model: before any step or restored checkpoint
    dataset = build_preference_dataset(recipe, tokenizer, split="train")
    eval_set = build_preference_dataset(recipe, tokenizer, split="eval")
    schedule = Schedule.from_recipe(recipe, len(dataset.examples))
    say_before_training(recipe, schedule, dataset.stats, console)  # preflight: schedule, truncated lines
    # after setup_reference: the optimizer sees the trained weights only
    stream_setup.start_streaming(model, streaming, device, console)  # before the optimizer: adapters on the GPU
    optimizer, state = start_run(model, recipe, device, resume, overwrite, console)
    started = state.global_step
    step = PreferenceStep(model, optimizer, recipe, device, reference, dataset, pad_token_id(tokenizer))
    state, timing = run_steps(step, schedule, state, console)
    summary_extra = {**_final_metrics(state.metrics), **streaming.summary()}
    if eval_set.examples:
        from onecard.train.preference_step import evaluate_preferences

        summary_extra.update(evaluate_preferences(model, reference, eval_set, recipe, device, pad_token_id(tokenizer)))
    reference.release()  # the saved adapter/ holds only the trained adapter
    summary = _finish(run_dir, recipe, model, tokenizer, state, timing, dataset, device, started, summary_extra)
    model.eval()
    return model, tokenizer, summary


def check_preference_recipe(recipe: Recipe) -> None:
    """Refusals that need the recipe only (before the model is loaded)."""
    from onecard.recipe import resolve_reference

    resolve_reference(recipe)
    t = recipe.training
    if recipe.task == "kto" and t.micro_batch_size * t.num_gpus * t.grad_accum < 2:
        raise UserError("KTO estimates its KL reference point from mismatched (prompt, completion) pairs of one "
                        "optimizer step; with 1 example per step there is nothing to mismatch",
                        where="training.grad_accum",
                        fix="use at least 2 examples per step (micro_batch_size x num_gpus x grad_accum >= 2), "
                        "e.g. --set training.grad_accum=8")


def _say_no_kernels(recipe: Recipe, console) -> None:
    """Preference steps run on plain transformers modules: the fused linear-CE kernel returns a loss, not the
    per-sequence log-probs DPO/KTO need, and the LoRA-aware fused MLP has not been checked against
    ``disable_adapter`` / ``set_adapter`` switching, which the reference relies on."""
    if recipe.training.kernels in ("onecard", "liger") and console is not None:
        console.print(f"[yellow]training.kernels {recipe.training.kernels!r} is not used for task {recipe.task}: "
                      "preference steps run on plain transformers modules[/yellow]")


class PreferenceStep(Step):
    """The DPO or KTO step over one window (train/preference_step.py), the reference policy beside the model."""

    def __init__(self, model, optimizer, recipe: Recipe, device: str, reference, dataset, pad_id: int):
        super().__init__(model, optimizer, recipe, device)
        self.reference, self.dataset, self.pad_id = reference, dataset, pad_id

    def backward(self, window: list[list[int]]) -> dict[str, Any]:
        from onecard.train.preference_step import dpo_step, kto_step

        step_fn = dpo_step if self.recipe.task == "dpo" else kto_step
        micro = [[self.dataset.examples[i] for i in idx] for idx in window]
        return step_fn(self.model, self.reference, micro, self.recipe, self.device, self.pad_id)

    def progress_text(self, record: dict[str, Any]) -> str:
        return progress_text(record)


_SUMMARY_KEYS = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "reward_desirable",
                 "reward_undesirable", "kl")


def _final_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    last = records[-1] if records else {}
    return {f"final_{k}": last[k] for k in _SUMMARY_KEYS if k in last}


def _finish(run_dir, recipe, model, tokenizer, state, timing, dataset, device, started, extra: dict[str, Any]):
    """The SFT loop's ``finish`` (weights, then summary.json), with the preference numbers added to the summary."""
    from onecard.train.summary import finish

    return finish(run_dir, recipe, model, tokenizer, state, timing, dataset, device, started,
                  extra=preference_extra(recipe, extra))


def preference_extra(recipe: Recipe, extra: dict[str, Any]) -> dict[str, Any]:
    """The preference numbers of the summary: the step's and eval metrics given, the loss settings."""
    return {**extra, "kernels": "none", "beta": recipe.preference.beta,
            "loss_type": recipe.preference.loss_type if recipe.task == "dpo" else "kto"}


def progress_text(metrics: dict[str, Any]) -> str:
    """What the progress bar shows beside the loss: reward accuracy and margin (KTO: KL)."""
    text = f"acc {metrics['reward_accuracy']:.2f}"
    if "reward_margin" in metrics:
        text += f" margin {metrics['reward_margin']:+.3f}"
    if "kl" in metrics:
        text += f" kl {metrics['kl']:.3f}"
    return text
