"""The SFT and DPO/KTO recipes on N processes (one per GPU, or N CPU processes on gloo): the spine
(train/spine.py), per rank.

Same order as the single-GPU recipes -- seed -> model -> data -> optimizer -> loop -> save -- and the same pieces
(model loading, the step loop, ``Schedule``, LR schedule, the task's loss, atomic checkpoints, ``finish``); what
the task brings (SFT: :class:`SFTRanks`, :class:`RankStep`; DPO/KTO: train/distributed_preference.py) is its
data, its step and its end; what differs is
listed in onecard.train.distributed: each rank's slice of every global micro-batch set, the window's loss divided by
the *global* trained-token count, and side effects (run directory, metrics, progress bar, checkpoint, result) from
rank 0 only. The rank's step and its checkpoint files: train/rank_step.py.
"""

from __future__ import annotations

from typing import Any

from onecard.errors import UserError
from onecard.recipe import Recipe
from onecard.train.rank_step import RankStep, restore_ranks
from onecard.train.sft import AppliedKernels, apply_recipe_kernels
from onecard.train.spine import Schedule, lint_or_stop, run_steps, seed_everything


def train_distributed_model(recipe: Recipe, resume: bool = False, console=None, overwrite: bool = False,
                            allow_recipe_change: bool = False):
    """(model, tokenizer, summary); ``summary`` is None on ranks other than 0."""
    from onecard.train import distributed as D
    from onecard.train import fsdp_load
    from onecard.train.checkpoint import TrainState
    from onecard.train.model import enable_grad_ckpt, load_model_and_tokenizer
    from onecard.train.optim import build_optimizer
    from onecard.train.resume_policy import record_resume
    from onecard.train.rundir import prepare_run_dir
    from onecard.train.summary import reset_peak_after_setup

    dist = D.init(recipe)
    D.check_strategy(recipe, dist.strategy)  # before loading: a rank of an external launcher had no parent check
    main_console = console if dist.is_main else None
    run_dir = recipe.run_dir
    done = dist.main_decides(lambda: check_run_state(recipe, dist.world, resume, overwrite, allow_recipe_change))
    if done is not None:
        _shutdown()
        return None, None, ({**done, "already_finished": True} if dist.is_main else None)
    lint_or_stop(recipe, main_console, device=dist.device)
    seed_everything(recipe.training.seed, recipe.training.deterministic)
    from onecard.train.memory_cap import apply_requested_cap

    apply_requested_cap(dist.device, main_console)  # --memory-cap-gib, per GPU: before anything is allocated there
    low_memory = fsdp_load.low_memory(dist)  # FSDP2: rank 0 reads the weights into host memory, the rest on meta
    model, tokenizer = (load_for_fsdp(recipe, dist) if low_memory else load_model_and_tokenizer(recipe, dist.device))
    meta_counts = dist.to_main(fsdp_load.meta_parameter_count(model))  # rank 0: every rank's, before the wrap
    task = task_ranks(dist, model, tokenizer, recipe, main_console)  # before wrapping: kernels, the reference
    schedule = Schedule.from_recipe(recipe, len(task.dataset.examples), dist.world)
    dist.barrier()
    if dist.is_main:
        if resume:
            record_resume(run_dir, recipe, main_console)  # resume policy: old recipe kept, resumes.jsonl
        prepare_run_dir(run_dir, recipe, overwrite)
    dist.barrier()
    if recipe.training.grad_ckpt:
        enable_grad_ckpt(model, recipe)  # transformers' checkpointing, as on one GPU (see distributed.fsdp_plugin)
    # Built on the plain model (weight decay tells matrices from vectors by their shape); accelerate re-points it
    # at FSDP2's sharded parameters when both are prepared together.
    model, optimizer = D.prepare(dist, model, build_optimizer(model, recipe, dist.device, main_console), recipe,
                                 low_memory)
    state = restore_ranks(run_dir, dist, model, optimizer) if resume else TrainState()
    setup = reset_peak_after_setup(dist.device)  # the load and wrap peak (plan: load_bytes), then the step's own
    started = state.global_step
    state, timing = run_steps(task.step(model, optimizer), schedule, state, main_console)
    extra = task.end(model, state)  # every rank: a held-out eval takes all of them
    extra["low_memory_loading"] = {"on": low_memory, "meta_params_before_wrap_by_rank": [m for m, _ in meta_counts],
                                   "params": meta_counts[0][1]} if dist.is_main else None
    extra.update(setup)
    summary = finish_ranks(dist, model, tokenizer, state, timing, task.dataset, recipe, started, extra)
    unwrapped = dist.accelerator.unwrap_model(model)
    _shutdown()
    return unwrapped, tokenizer, summary


def load_for_fsdp(recipe: Recipe, dist):
    """(model, tokenizer) for this rank: rank 0's base in host memory, the others' on meta; adapters applied
    (train/fsdp_load.py)."""
    from onecard.train.model import load_model_and_tokenizer

    if recipe.training.offload_weights is True:
        raise UserError("training.offload_weights streams one GPU's frozen weights from host memory; under FSDP the "
                        "weights are sharded over the GPUs instead", where="training.offload_weights",
                        fix="set training.offload_weights: false with --num-gpus (or train on one GPU)")
    return load_model_and_tokenizer(recipe, dist.device, place="host" if dist.is_main else "meta")


def check_run_state(recipe: Recipe, world: int, resume: bool, overwrite: bool, allow_recipe_change: bool):
    """Rank 0's checks of the run directory before any work: the stored summary of a finished run (nothing to do),
    else None; a UserError for flags the directory contradicts or a checkpoint of another world size."""
    from onecard.train.checkpoint import check_resume_world
    from onecard.train.resume_policy import check_resume
    from onecard.train.rundir import check_run_dir

    if (done := check_resume(recipe, resume, allow_recipe_change)) is not None:
        return done
    check_run_dir(recipe.run_dir, resume, overwrite)
    if resume:
        check_resume_world(recipe.run_dir, world)
    return None


# --------------------------------------------------------------------------- the task


def task_ranks(dist, model, tokenizer, recipe: Recipe, console=None):
    """What the recipe's task brings to the N-rank spine: ``.dataset``, ``.step(model, optimizer)``,
    ``.end(model, state)`` (the summary's extra keys; run on every rank)."""
    if recipe.task in ("dpo", "kto"):
        from onecard.train.distributed_preference import PreferenceRanks

        return PreferenceRanks(dist, model, tokenizer, recipe, console)
    return SFTRanks(dist, model, tokenizer, recipe, console)


class SFTRanks:
    def __init__(self, dist, model, tokenizer, recipe: Recipe, console=None):
        from onecard.data import build_dataset, pad_token_id

        self.dist, self.recipe, self.pad_id = dist, recipe, pad_token_id(tokenizer)
        self.kernels = kernels_for_strategy(dist, model, recipe, console)  # patches the instance
        self.dataset = build_dataset(recipe, tokenizer, split="train")

    def step(self, model, optimizer) -> "RankStep":
        return RankStep(model, optimizer, self.recipe, self.dist, self.dataset, self.pad_id, self.kernels.fused_loss)

    def end(self, model, state) -> dict[str, Any]:
        self.kernels.revert()  # the saved adapter/model sees plain transformers modules
        return {"kernels": self.kernels.name}


# --------------------------------------------------------------------------- the step


FSDP_KERNELS_NOTICE = ("onecard's kernels are off under FSDP: its fused LoRA ops have not been run on FSDP2's "
                       "sharded (DTensor) parameters; running plain transformers (--strategy ddp keeps the kernels "
                       "when the model fits one GPU)")


def kernels_for_strategy(dist, model, recipe: Recipe, console=None):
    """The recipe's kernels under DDP (or one process); none under FSDP, with a one-line notice. Under FSDP1 the
    fused ops (kernels/lora_linear.py, lora_mlp.py) read adapter weights outside the LoRA linears' own units; FSDP2's
    layer units gather them for the whole layer's forward, but the kernels on DTensor parameters are unmeasured
    (notes/multigpu-gpu-todo.md)."""
    if dist.strategy == "fsdp" and recipe.training.kernels != "none":
        if console is not None:
            console.print(f"[yellow]{FSDP_KERNELS_NOTICE}[/yellow]")
        return AppliedKernels("none", False)
    return apply_recipe_kernels(model, recipe, dist.device, console)


# --------------------------------------------------------------------------- result


class _WithStateDict:
    """What ``rundir.save_result`` needs of a model, saving a gathered FSDP state dict instead of shards."""

    def __init__(self, model, state_dict):
        self._model, self._state_dict, self.config = model, state_dict, getattr(model, "config", None)

    def save_pretrained(self, path, **kwargs):
        from onecard.train.fsdp_save import save_gathered

        save_gathered(self._model, path, self._state_dict, **kwargs)

    def parameters(self):
        return self._model.parameters()


def finish_ranks(dist, model, tokenizer, state, timing, dataset, recipe: Recipe, started: int,
                 extra: dict[str, Any] | None = None):
    from onecard.train.summary import finish

    unwrapped = dist.accelerator.unwrap_model(model)
    if dist.strategy == "fsdp":
        from onecard.train.fsdp_save import gathered_trainable

        unwrapped = _WithStateDict(unwrapped, gathered_trainable(model))  # every rank takes part
    summary = None
    if dist.is_main:
        summary = finish(recipe.run_dir, recipe, unwrapped, tokenizer, state, timing, dataset, dist.device, started,
                         extra={"num_gpus": dist.world, "strategy": dist.strategy,
                                "peak_memory_note": "rank 0's peak; tokens and tokens/s are over all ranks",
                                **(extra or {})})
    dist.barrier()
    return summary


def _shutdown() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()
