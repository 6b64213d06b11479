"""The SFT and DPO/KTO recipes on N processes (one per GPU, or N CPU processes on gloo): the spine
(train/spine.py), per rank.

Same order as the single-GPU recipes -- seed -> model -> data -> optimizer -> loop -> save -- and the same pieces
(model loading, the step loop, ``Schedule``, LR schedule, the task's loss, atomic checkpoints, ``finish``); what
the task brings (SFT: :class:`SFTRanks`, :class:`RankStep`; DPO/KTO: train/distributed_preference.py) is its
data, its step and its end; what differs is
listed in onecard.train.distributed: each rank's slice of every global micro-batch set, the window's loss divided by
the *global* trained-token count, and side effects (run directory, metrics, progress bar, checkpoint, result) from
rank 0 only. Checkpoints resume on the same number of processes: next to ``checkpoints/step-N/`` (rank 0's, the
single-GPU format) sits ``checkpoints/ranks-step-N/`` with ``world.json`` and one ``rank-<r>.pt`` per rank (its RNG
states, and under FSDP its parameter and optimizer shards). The rank files are written first, then the step
directory and ``latest``: whatever ``latest`` names has its rank files.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from onecard.errors import UserError
from onecard.recipe import Recipe
from onecard.train.checkpoint import ranks_dir
from onecard.train.files import write_atomic
from onecard.train.sft import AppliedKernels, apply_recipe_kernels, micro_batch_loss, trained_tokens
from onecard.train.spine import Schedule, Step, lint_or_stop, run_steps, seed_everything


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
    model, tokenizer = (fsdp_load.load_for_fsdp(recipe, dist) if low_memory
                        else load_model_and_tokenizer(recipe, dist.device))
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


class RankStep(Step):
    """One rank's share of a global step: its slice of every global micro-batch set, the loss divided by the
    window's *global* trained-token count, the all-rank gradient norm, and checkpoints with rank files."""

    def __init__(self, model, optimizer, recipe: Recipe, dist, dataset, pad_id: int, fused_loss: bool):
        super().__init__(model, optimizer, recipe, dist.device)
        self.dist, self.dataset, self.pad_id, self.fused_loss = dist, dataset, pad_id, fused_loss
        self.logs = dist.is_main
        self.one_process = False

    def backward(self, window: list[list[int]]) -> dict[str, Any]:
        """This rank's backward passes scaled to the global token count (memory in the record: this rank's)."""
        from onecard.data import collate
        from onecard.train.distributed import rank_slices

        dist, model = self.dist, self.model
        flat = [i for part in window for i in part]
        slices = rank_slices(flat, self.recipe.training.micro_batch_size, dist.world, dist.rank)
        micro = [(collate([self.dataset.examples[i] for i in (idx or flat[:1])], self.pad_id), 1.0 if idx else 0.0)
                 for idx in slices]
        local = [sum(trained_tokens(b) * w for b, w in micro), sum(int(b["attention_mask"].sum()) * w for b, w in micro)]
        window_tokens, n_tokens = dist.all_sum(local)
        window_tokens = max(1.0, window_tokens)
        loss_total = 0.0
        for i, (batch, weight) in enumerate(micro):
            last = i == len(micro) - 1
            # DDP: reduce gradients once per window. FSDP: every micro-batch (no_sync would keep unsharded grads).
            sync = contextlib.nullcontext() if last or dist.strategy != "ddp" else dist.accelerator.no_sync(model)
            with sync:
                loss_total += weight * self._backward(batch, weight, window_tokens)
        loss = dist.all_sum([loss_total])[0] / window_tokens
        return {"loss": loss, "tokens": int(n_tokens), "trained_tokens": int(window_tokens)}

    def _backward(self, batch, weight: float, window_tokens: float) -> float:
        """Backward of ``weight x world x summed CE / window_tokens``; returns the summed CE. The factor ``world``:
        DDP and FSDP average gradients over ranks, and the window's gradient is their sum."""
        world = self.dist.world
        if self.fused_loss:  # the patched forward returns sum / num_items_in_batch without materialising the logits
            return micro_batch_loss(self.model, batch, self.device, window_tokens / world, lambda loss: loss * weight)
        return micro_batch_loss(self.model, batch, self.device, None,
                                lambda loss_sum: loss_sum * (weight * world / window_tokens))

    def clip(self, max_grad_norm: float | None) -> float | None:
        if max_grad_norm is None:
            return None
        return self.dist.clip_grad_norm_(self.model, max_grad_norm)  # FSDP: the all-rank norm

    def save(self, state) -> None:
        save_ranks(self.dist, self.model, self.optimizer, state, self.recipe)


# --------------------------------------------------------------------------- checkpoints


def save_ranks(dist, model, optimizer, state, recipe: Recipe) -> None:
    """Every rank's file (its RNG states; under FSDP its shards), then rank 0's single-GPU checkpoint and
    ``latest``: whatever ``latest`` names has its rank files. Rank 0 writes them all -- the run directory may exist
    on its node only -- receiving one rank's blob at a time, so its host holds one shard beyond its own."""
    import torch

    from onecard.train.checkpoint import rng_state, save_checkpoint

    blob: dict[str, Any] = {"rng": rng_state()}
    full: dict[str, Any] = {}
    if dist.strategy == "fsdp":  # this rank's shards, by the model's parameter names
        from onecard.train.distributed import local_shards
        from onecard.train.fsdp_save import gathered_trainable

        blob.update(local_shards(model, optimizer))
        full = {"trainable": gathered_trainable(model), "optimizer_state": blob["optimizer"]}  # step-N/: whole weights
    ranks = ranks_dir(recipe.run_dir / "checkpoints" / f"step-{state.global_step}")
    if dist.is_main:
        ranks.mkdir(parents=True, exist_ok=True)
        write_atomic(ranks / "world.json", lambda p: p.write_text(json.dumps({"world_size": dist.world})))
    for rank in range(dist.world):
        received = dist.send_to_main(blob, rank)
        if dist.is_main:
            write_atomic(ranks / f"rank-{rank}.pt", lambda p: torch.save(received, p))
    if dist.is_main:
        save_checkpoint(recipe.run_dir, dist.accelerator.unwrap_model(model), optimizer, state,
                        {"kind": recipe.training.lr_scheduler, "step": state.global_step}, **full)
    dist.barrier()


def restore_ranks(run_dir: Path, dist, model, optimizer):
    """Rank 0 reads the checkpoint and hands each rank its own file (and, under DDP, its weights and optimizer
    state); no other rank opens the run directory."""
    import torch

    from onecard.train.checkpoint import load_latest, load_trainable, set_rng_state

    ckpt = load_latest(run_dir) if dist.is_main else None
    if not dist.from_main(ckpt is not None):  # check_run_state ruled this out; every rank stops alike anyway
        raise UserError("no checkpoint to resume from", where=str(run_dir))
    blob = None
    for rank in range(dist.world):
        # weights_only=False: RNG states are Python/NumPy tuples; onecard wrote this file itself.
        mine = torch.load(ranks_dir(ckpt["path"]) / f"rank-{rank}.pt", map_location="cpu",
                          weights_only=False) if dist.is_main else None
        got = dist.send_from_main(mine, rank)
        blob = got if rank == dist.rank else blob
    if dist.strategy == "fsdp":
        from onecard.train.distributed import load_local_shards

        load_local_shards(model, optimizer, blob)
    else:  # DDP: every rank holds the same weights and optimizer state, rank 0's files
        trainable, optim_state = dist.from_main((ckpt["trainable"], ckpt["optimizer"]) if dist.is_main else None)
        load_trainable(dist.accelerator.unwrap_model(model), trainable)
        optimizer.load_state_dict(optim_state)
    set_rng_state(blob["rng"])
    return dist.from_main(ckpt["state"] if dist.is_main else None)


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
