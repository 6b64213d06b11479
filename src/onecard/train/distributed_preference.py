"""DPO and KTO on N processes: what the preference task brings to the N-rank spine (train/distributed_loop.py).

The step is train/preference_step.py's, handed this rank's :class:`~onecard.train.preference_step.Share` of the
window: its slice of every global micro-batch set (train/distributed.py ``rank_slices``, as SFT), the window's
summed loss divided by the global pair (DPO) or example (KTO) count and multiplied by N, KTO's KL point over the
whole window's mismatched pairs, metrics summed over ranks. The reference policy (train/preference_reference.py)
is set up on each rank's model before wrapping -- the adapter disabled, or the starting adapter loaded a second
time -- and runs on the rank's own slice; it is the same module object accelerate wraps (DDP holds it inside,
FSDP2's ``fully_shard`` changes its class in place), so under FSDP2 a reference pass gathers the shards as the
policy's does. The held-out eval at the end is split over the ranks too.
"""

from __future__ import annotations

import contextlib
from typing import Any

from onecard.recipe import Recipe
from onecard.train.rank_step import RankStep


class PreferenceRanks:
    """The reference and the preference data on each rank, the step, and the end: eval, then the reference
    dropped so ``adapter/`` holds only the trained adapter."""

    def __init__(self, dist, model, tokenizer, recipe: Recipe, console=None):
        from onecard.data import pad_token_id
        from onecard.data.preference import build_preference_dataset
        from onecard.train.preference import _say_no_kernels, check_preference_recipe
        from onecard.train.preference_reference import setup_reference

        check_preference_recipe(recipe)
        _say_no_kernels(recipe, console)
        self.dist, self.recipe, self.pad_id = dist, recipe, pad_token_id(tokenizer)
        self.reference = setup_reference(model, recipe)  # the starting model: before any step or restore
        self.dataset = build_preference_dataset(recipe, tokenizer, split="train")
        self.eval_set = build_preference_dataset(recipe, tokenizer, split="eval")

    def step(self, model, optimizer) -> "RankPreferenceStep":
        return RankPreferenceStep(model, optimizer, self.recipe, self.dist, self.reference, self.dataset,
                                  self.pad_id)

    def end(self, model, state) -> dict[str, Any]:
        from onecard.train.preference import _final_metrics, preference_extra
        from onecard.train.preference_step import Share, evaluate_preferences

        extra = _final_metrics(state.metrics) if self.dist.is_main else {}
        if self.eval_set.examples:
            share = Share([], [], [], self.dist.world, self.dist.rank, self.dist.all_sum)
            extra.update(evaluate_preferences(model, self.reference, self.eval_set, self.recipe, self.dist.device,
                                              self.pad_id, share))
        self.reference.release()
        return preference_extra(self.recipe, extra)


class RankPreferenceStep(RankStep):
    """One rank's share of a DPO/KTO global step; clipping and checkpoints are the SFT rank step's."""

    def __init__(self, model, optimizer, recipe: Recipe, dist, reference, dataset, pad_id: int):
        super().__init__(model, optimizer, recipe, dist, dataset, pad_id, fused_loss=False)
        self.reference = reference

    def backward(self, window: list[list[int]]) -> dict[str, Any]:
        from onecard.train.distributed import rank_slices
        from onecard.train.preference_step import Share, dpo_step, kto_step

        dist, examples = self.dist, self.dataset.examples
        flat = [i for part in window for i in part]
        slices = rank_slices(flat, self.recipe.training.micro_batch_size, dist.world, dist.rank)
        share = Share([[examples[i] for i in (idx or flat[:1])] for idx in slices],
                      [1.0 if idx else 0.0 for idx in slices], [examples[i] for i in flat], dist.world, dist.rank,
                      dist.all_sum, self._sync)
        step_fn = dpo_step if self.recipe.task == "dpo" else kto_step
        return step_fn(self.model, self.reference, share.micro, self.recipe, self.device, self.pad_id, share)

    def _sync(self, last: bool):
        """DDP: reduce gradients once per window. FSDP: every micro-batch (no_sync would keep unsharded grads)."""
        if last or self.dist.strategy != "ddp":
            return contextlib.nullcontext()
        return self.dist.accelerator.no_sync(self.model)

    def progress_text(self, record: dict[str, Any]) -> str:
        from onecard.train.preference import progress_text

        return progress_text(record)
