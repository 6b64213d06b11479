"""The SFT recipe on N processes (one per GPU, or N CPU processes on gloo): the spine of train/loop.py, per rank.

Same order as the single-GPU loop -- seed -> model -> data -> optimizer -> loop -> save -- and the same pieces
(model loading, ``Schedule``, LR schedule, token cross-entropy, atomic checkpoints, ``finish``); what differs is
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
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from onecard.errors import UserError
from onecard.recipe import Recipe


def train_distributed_model(recipe: Recipe, resume: bool = False, console=None, overwrite: bool = False):
    """(model, tokenizer, summary); ``summary`` is None on ranks other than 0."""
    from onecard.data import build_dataset
    from onecard.train import distributed as D
    from onecard.train.checkpoint import TrainState
    from onecard.train.loop import lint_or_stop, seed_everything
    from onecard.train.model import enable_grad_ckpt, load_model_and_tokenizer
    from onecard.train.optim import build_optimizer
    from onecard.train.resume_policy import record_resume
    from onecard.train.rundir import check_run_dir, prepare_run_dir

    dist = D.init(recipe)
    main_console = console if dist.is_main else None
    run_dir = recipe.run_dir
    check_run_dir(run_dir, resume, overwrite)  # every rank: read-only, and every rank must stop alike
    if resume:
        check_resume_world(run_dir, dist.world)
    lint_or_stop(recipe, main_console)
    seed_everything(recipe.training.seed)
    model, tokenizer = load_model_and_tokenizer(recipe, dist.device)
    kernels = kernels_for_strategy(dist, model, recipe, main_console)  # before wrapping: patches the instance
    dataset = build_dataset(recipe, tokenizer, split="train")
    schedule = global_schedule(recipe, len(dataset.examples), dist.world)
    dist.barrier()  # every rank has read the run directory before rank 0 changes it
    if dist.is_main:
        if resume:
            record_resume(run_dir, recipe, main_console)  # resume policy: old recipe kept, resumes.jsonl
        prepare_run_dir(run_dir, recipe, overwrite)
    dist.barrier()
    if recipe.training.grad_ckpt:
        enable_grad_ckpt(model, recipe)  # transformers' checkpointing, as on one GPU (see distributed.fsdp_plugin)
    model = D.prepare_model(dist, model, recipe)
    # After wrapping: FSDP1 replaces parameters, and accelerate does not re-point an optimizer built before.
    optimizer = dist.accelerator.prepare(build_optimizer(model, recipe, dist.device, main_console))
    state = restore_ranks(run_dir, dist, model, optimizer) if resume else TrainState()
    started = state.global_step
    state, timing = run_steps(dist, model, tokenizer, optimizer, dataset, schedule, state, recipe, main_console,
                              fused_loss=kernels.fused_loss)
    kernels.revert()  # the saved adapter/model sees plain transformers modules
    summary = finish_ranks(dist, model, tokenizer, state, timing, dataset, recipe, started)
    if summary is not None:
        summary["kernels"] = kernels.name
    unwrapped = dist.accelerator.unwrap_model(model)
    _shutdown()
    return unwrapped, tokenizer, summary


def global_schedule(recipe: Recipe, n_examples: int, world: int):
    """The single-GPU ``Schedule`` with micro-batch sets of ``micro_batch_size x world`` (the global batch)."""
    from onecard.train.loop import Schedule

    Schedule.from_recipe(recipe, n_examples)  # the same user errors as one GPU
    t = recipe.training
    per_step = t.micro_batch_size * world * t.grad_accum
    steps_per_epoch = math.ceil(n_examples / per_step)
    total = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))
    return Schedule(n_examples, t.micro_batch_size * world, t.grad_accum, steps_per_epoch, total)


# --------------------------------------------------------------------------- the loop


def run_steps(dist, model, tokenizer, optimizer, dataset, schedule, state, recipe: Recipe, console,
              fused_loss: bool = False):
    import torch

    from onecard.data import collate, epoch_order, pad_token_id
    from onecard.train.distributed import rank_slices
    from onecard.train.loop import Rate, account_step
    from onecard.train.metrics import MetricsLogger, TrainProgress

    t = recipe.training
    logger = MetricsLogger(recipe.run_dir, state.metrics) if dist.is_main else None
    progress = TrainProgress(console, schedule.total_steps, state.global_step)
    pad_id, order = pad_token_id(tokenizer), (-1, [])
    rate = Rate()
    model.train()
    try:
        while state.global_step < schedule.total_steps:
            epoch, position = divmod(state.global_step, schedule.steps_per_epoch)
            if order[0] != epoch:
                order = (epoch, epoch_order(schedule.n_examples, t.seed, epoch, shuffle=recipe.data.shuffle))
            window = [i for part in schedule.window(order[1], position) for i in part]
            slices = rank_slices(window, t.micro_batch_size, dist.world, dist.rank)
            micro = [(collate([dataset.examples[i] for i in (idx or window[:1])], pad_id), 1.0 if idx else 0.0)
                     for idx in slices]
            record = optimizer_step(dist, model, optimizer, micro, recipe, state.global_step, schedule.total_steps,
                                    fused_loss)
            account_step(state, record, schedule, recipe, rate, dist.device, logger)  # memory: this rank's
            progress.update(state.global_step, record["loss"], record["tokens_per_s"], record["peak_memory_bytes"])
            checkpoint_if_due(dist, model, optimizer, state, schedule, recipe, logger)
    finally:
        progress.close()
        if logger is not None:
            logger.close()
    state.metrics = list(logger.records) if logger is not None else []
    if dist.device.startswith("cuda"):
        torch.cuda.synchronize()
    return state, {"seconds": time.perf_counter() - rate.start, "tokens": rate.tokens}


def optimizer_step(dist, model, optimizer, micro, recipe: Recipe, step: int, total_steps: int,
                   fused_loss: bool = False) -> dict:
    """One global step: LR, this rank's backward passes scaled to the global token count, clip, step."""
    from onecard.data import model_inputs
    from onecard.train.loop import trained_tokens
    from onecard.train.optim import set_lr

    lr = set_lr(optimizer, recipe, step, total_steps)
    local = [sum(trained_tokens(b) * w for b, w in micro), sum(int(b["attention_mask"].sum()) * w for b, w in micro)]
    window_tokens, n_tokens = dist.all_sum(local)
    window_tokens = max(1.0, window_tokens)
    loss_total = 0.0
    for i, (batch, weight) in enumerate(micro):
        last = i == len(micro) - 1
        # DDP: reduce gradients once per window. FSDP: every micro-batch (no_sync would keep unsharded grads).
        sync = contextlib.nullcontext() if last or dist.strategy != "ddp" else dist.accelerator.no_sync(model)
        with sync:
            loss_total += weight * _backward(dist, model, model_inputs(batch), batch["labels"], weight,
                                             window_tokens, fused_loss)
    loss = dist.all_sum([loss_total])[0] / window_tokens
    grad_norm = None
    if recipe.training.max_grad_norm is not None:
        grad_norm = dist.clip_grad_norm_(model, recipe.training.max_grad_norm)  # FSDP: the all-rank norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(n_tokens),
            "trained_tokens": int(window_tokens)}


def _backward(dist, model, inputs, labels, weight: float, window_tokens: float, fused_loss: bool) -> float:
    """Backward of ``weight x world x summed CE / window_tokens``; returns the summed CE. The factor ``world``:
    DDP and FSDP average gradients over ranks, and the window's gradient is their sum."""
    from onecard.train.loop import token_ce_sum

    inputs = {k: (v.to(dist.device) if hasattr(v, "to") else v) for k, v in inputs.items()}
    inputs.setdefault("use_cache", False)
    if fused_loss:  # the patched forward returns sum / num_items_in_batch without materialising the logits
        per_rank_items = window_tokens / dist.world
        loss = model(**inputs, labels=labels.to(dist.device), num_items_in_batch=per_rank_items).loss
        (loss * weight).backward()
        return float(loss.detach()) * per_rank_items
    loss_sum, _ = token_ce_sum(model(**inputs).logits, labels)
    (loss_sum * (weight * dist.world / window_tokens)).backward()
    return float(loss_sum.detach())


# --------------------------------------------------------------------------- checkpoints


def _ranks_dir(step_dir: Path) -> Path:
    return step_dir.parent / f"ranks-{step_dir.name}"


def check_resume_world(run_dir: Path, world: int) -> None:
    """Refuse to resume on a different number of processes than wrote the checkpoint (also for one GPU)."""
    from onecard.train.checkpoint import latest_checkpoint

    path = latest_checkpoint(run_dir)
    if path is None:
        return
    meta = _ranks_dir(path) / "world.json"
    written = json.loads(meta.read_text(encoding="utf-8"))["world_size"] if meta.is_file() else 1
    if written != world:
        raise UserError(f"the checkpoint was written by {written} process(es); resuming on {world} is not supported "
                        "(the data split and sharded states depend on the number of GPUs)", where=str(path),
                        fix=f"resume with --num-gpus {written}" if written > 1 else "resume without --num-gpus")


def checkpoint_if_due(dist, model, optimizer, state, schedule, recipe: Recipe, logger) -> None:
    import torch

    from onecard.train.checkpoint import rng_state, save_checkpoint
    from onecard.train.loop import CRASH_ENV

    every = recipe.training.save_every_steps
    if not every or state.global_step % every:
        return
    root = recipe.run_dir / "checkpoints"
    ranks = _ranks_dir(root / f"step-{state.global_step}")
    if dist.is_main:
        ranks.mkdir(parents=True, exist_ok=True)
        _write_atomic(ranks / "world.json", lambda p: p.write_text(json.dumps({"world_size": dist.world})))
    dist.barrier()
    blob: dict[str, Any] = {"rng": rng_state()}
    if dist.strategy == "fsdp":  # this rank's shards, by the wrapped model's own names
        blob["params"] = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        blob["optimizer"] = optimizer.state_dict()
    _write_atomic(ranks / f"rank-{dist.rank}.pt", lambda p: torch.save(blob, p))
    dist.barrier()
    if dist.is_main:
        state.epoch, state.step_in_epoch = divmod(state.global_step, schedule.steps_per_epoch)
        state.metrics = list(logger.records)
        save_checkpoint(recipe.run_dir, dist.accelerator.unwrap_model(model), optimizer, state,
                        {"kind": recipe.training.lr_scheduler, "step": state.global_step})
        _prune_ranks(root)
    dist.barrier()
    if int(os.environ.get(CRASH_ENV, "0") or 0) == state.global_step:
        os._exit(17)  # tests: every rank dies right after the checkpoint, as a killed job would


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _prune_ranks(root: Path) -> None:
    for ranks in root.glob("ranks-step-*"):
        if not (root / ranks.name[len("ranks-"):]).is_dir():
            shutil.rmtree(ranks, ignore_errors=True)


def restore_ranks(run_dir: Path, dist, model, optimizer):
    import torch

    from onecard.train.checkpoint import load_latest, load_trainable, set_rng_state

    ckpt = load_latest(run_dir)
    if ckpt is None:
        raise UserError("no checkpoint to resume from", where=str(run_dir))
    # weights_only=False: RNG states are Python/NumPy tuples; onecard wrote this file itself.
    blob = torch.load(_ranks_dir(ckpt["path"]) / f"rank-{dist.rank}.pt", map_location="cpu", weights_only=False)
    if dist.strategy == "fsdp":
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in blob["params"].items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        optimizer.load_state_dict(blob["optimizer"])
    else:  # DDP: every rank holds the same weights and optimizer state, rank 0's files
        load_trainable(dist.accelerator.unwrap_model(model), ckpt["trainable"])
        optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(blob["rng"])
    return ckpt["state"]


FSDP_KERNELS_NOTICE = ("onecard's kernels are off under FSDP: its fused LoRA ops read adapter weights that FSDP "
                       "shards into their own units (gathered only inside those modules' forward); running plain "
                       "transformers (--strategy ddp keeps the kernels when the model fits one GPU)")


def kernels_for_strategy(dist, model, recipe: Recipe, console=None):
    """The recipe's kernels under DDP (or one process); none under FSDP, with a one-line notice. peft's FSDP wrap
    policy makes every LoRA linear its own unit, whose parameters are whole only inside that linear's forward; the
    fused ops (kernels/lora_linear.py, lora_mlp.py) read them from outside it."""
    from onecard.train.loop import AppliedKernels, apply_recipe_kernels

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


def finish_ranks(dist, model, tokenizer, state, timing, dataset, recipe: Recipe, started: int):
    from onecard.train.summary import finish

    unwrapped = dist.accelerator.unwrap_model(model)
    if dist.strategy == "fsdp":
        unwrapped = _WithStateDict(unwrapped, dist.accelerator.get_state_dict(model))  # every rank gathers
    summary = None
    if dist.is_main:
        summary = finish(recipe.run_dir, recipe, unwrapped, tokenizer, state, timing, dataset, dist.device, started,
                         extra={"num_gpus": dist.world, "strategy": dist.strategy,
                                "peak_memory_note": "rank 0's peak; tokens and tokens/s are over all ranks"})
    dist.barrier()
    return summary


def _shutdown() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()
