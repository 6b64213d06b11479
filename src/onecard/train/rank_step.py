"""One rank's share of a global step, and the checkpoint files that let N ranks resume (train/distributed_loop.py).

Checkpoints resume on the same number of processes: next to ``checkpoints/step-N/`` (rank 0's, the single-GPU
format) sits ``checkpoints/ranks-step-N/`` with ``world.json`` and one ``rank-<r>.pt`` per rank (its RNG states, and
under FSDP its parameter and optimizer shards). The rank files are written first, then the step directory and
``latest``: whatever ``latest`` names has its rank files.
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
from onecard.train.sft_step import micro_batch_loss, trained_tokens
from onecard.train.spine import Step


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
