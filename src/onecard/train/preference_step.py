"""One optimizer step's gradients for DPO and KTO, and held-out preference evaluation, on one process or N.

Normalisation under gradient accumulation follows the spine's rule (train/spine.py): each micro-batch's
*summed* per-pair (DPO) or per-example (KTO) loss is divided by the number in the whole accumulation window, so
the gradient equals that of one batch holding the window, whatever the micro-batch split. trl takes the mean per
micro-batch instead, which differs when the last window of an epoch is short.

KTO's KL reference point is estimated once per window from mismatched pairs of the whole window (trl does it per
device batch, and refuses batch size 1 because the estimate then degenerates into the reward itself). It carries
no gradient, so estimating it over the window keeps micro-batch 1 x accumulation 8 equal to 8 x 1.

On N processes (:class:`Share`) each one holds its slice of the window's micro-batches (train/distributed.py
``rank_slices``): its summed loss is divided by the *global* window count and multiplied by N, because DDP and FSDP
average gradients over ranks. The window count needs no collective -- every rank is handed the whole window's
indices. KTO's KL point is the mean over the global window's mismatched pairs: each rank builds all the pairs
(the dataset is on every rank), runs its slice of them, and the sum and count are summed over ranks. Metrics are
sums reduced in one call, then divided: N ranks report what one process would.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

from onecard.data.preference import collate_dpo, collate_kto, collate_rows, kl_rows
from onecard.train.preference_loss import completion_logps, dpo_loss, kto_loss
from onecard.train.preference_reference import Reference, eval_mode


def _no_sum(values: list[float]) -> list[float]:
    return values


def _no_sync(last: bool):
    return contextlib.nullcontext()


@dataclass
class Share:
    """This process's part of one window. ``micro`` its micro-batches, ``weights`` 1.0, or 0.0 for a stand-in batch
    a rank runs when its slice is empty (DDP and FSDP need every rank in every collective); ``window`` the whole
    window's examples (all ranks'); ``all_sum`` the element-wise sum over ranks; ``sync(last)`` the gradient
    synchronisation context of a micro-batch (DDP: ``no_sync`` but for the last)."""

    micro: list[list[dict]]
    weights: list[float]
    window: list[dict]
    world: int = 1
    rank: int = 0
    all_sum: Callable[[list[float]], list[float]] = _no_sum
    sync: Callable[[bool], Any] = field(default=_no_sync)

    @classmethod
    def whole(cls, micro: list[list[dict]]) -> "Share":
        """One process holding the whole window."""
        return cls(micro, [1.0] * len(micro), [ex for examples in micro for ex in examples])

    def scale(self, weight: float) -> float:
        """The factor of a micro-batch's summed loss: its weight x N / the global window count."""
        return weight * self.world / len(self.window)


def _reference_logps(reference: Reference, batch, device: str):
    import torch

    with torch.no_grad(), reference.active() as ref_model:
        logps, _ = completion_logps(ref_model, batch, device)
    return logps


def _tokens(batch) -> tuple[int, int]:
    return int(batch["attention_mask"].sum()), int((batch["labels"][:, 1:] != -100).sum())


def dpo_step(model, reference: Reference, micro: list[list[dict]], recipe, device: str, pad_id: int,
             share: Share | None = None) -> dict[str, Any]:
    """Backward over one window of DPO pairs (``share``: this rank's part; None: the whole ``micro``); returns the
    step's metrics (loss, rewards, margin, accuracy) over the whole window."""
    pref = recipe.preference
    share = share or Share.whole(micro)
    sums = [0.0] * 7  # loss, then _dpo_sums, then tokens, trained tokens
    for i, (examples, weight) in enumerate(zip(share.micro, share.weights)):
        batch = collate_dpo(examples, pad_id)
        ref = _reference_logps(reference, batch, device)  # first: its activations are gone before the policy's
        with share.sync(i == len(share.micro) - 1):
            logps, counts = completion_logps(model, batch, device)
            n = len(examples)
            terms = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], pref.beta, pref.loss_type, counts[:n],
                             counts[n:])
            (terms.losses.sum() * share.scale(weight)).backward()
        part = [float(terms.losses.detach().sum()), *_dpo_sums(terms.chosen_rewards, terms.rejected_rewards),
                *_tokens(batch)]
        sums = [s + weight * v for s, v in zip(sums, part)]
    sums = share.all_sum(sums)
    return {"loss": sums[0] / len(share.window), **_dpo_means(sums[1:5]), "tokens": int(sums[5]),
            "trained_tokens": int(sums[6])}


def _dpo_sums(chosen, rejected) -> list[float]:
    """[pairs, summed chosen rewards, summed rejected rewards, pairs ranked right (ties wrong, as trl)]."""
    return [float(chosen.numel()), float(chosen.sum()), float(rejected.sum()), float((chosen > rejected).sum())]


def _dpo_means(sums: list[float]) -> dict[str, float]:
    n, chosen, rejected, right = sums
    return {"reward_chosen": chosen / n, "reward_rejected": rejected / n, "reward_margin": (chosen - rejected) / n,
            "reward_accuracy": right / n}


def window_kl(model, reference: Reference, window: list[dict], chunk: int, device: str, pad_id: int,
              share: Share | None = None) -> float:
    """KTO's KL estimate over the whole window's mismatched pairs (0 for a window of one: nothing to mismatch): the
    mean log-ratio clamped at 0, no gradient (train/preference_loss.py ``kto_kl``), from this rank's chunks of the
    pairs and a sum over ranks."""
    import torch

    from onecard.train.distributed import rank_slices

    if len(window) < 2:
        return 0.0
    world, rank, all_sum = (share.world, share.rank, share.all_sum) if share else (1, 0, _no_sum)
    rows = kl_rows(window)
    ratio_sum, count = 0.0, 0.0
    for part in rank_slices(list(range(len(rows))), chunk, world, rank):
        batch = collate_rows([rows[i] for i in (part or [0])], pad_id)
        with torch.no_grad(), eval_mode(model):
            pi = completion_logps(model, batch, device)[0]
        ratio = pi - _reference_logps(reference, batch, device)
        weight = 1.0 if part else 0.0
        ratio_sum, count = ratio_sum + weight * float(ratio.double().sum()), count + weight * ratio.numel()
    ratio_sum, count = all_sum([ratio_sum, count])
    return max(0.0, ratio_sum / count)


def kto_step(model, reference: Reference, micro: list[list[dict]], recipe, device: str, pad_id: int,
             share: Share | None = None) -> dict[str, Any]:
    """Backward over one window of KTO examples (``share`` as in :func:`dpo_step`); returns the step's metrics
    (loss, KL, rewards, accuracy) over the whole window."""
    import torch

    pref = recipe.preference
    share = share or Share.whole(micro)
    kl = window_kl(model, reference, share.window, recipe.training.micro_batch_size, device, pad_id, share)
    kl_t = torch.tensor(kl, dtype=torch.float32, device=device)
    sums = [0.0] * 9  # loss, then _kto_sums, then tokens, trained tokens
    for i, (examples, weight) in enumerate(zip(share.micro, share.weights)):
        batch = collate_kto(examples, pad_id)
        ref = _reference_logps(reference, batch, device)
        with share.sync(i == len(share.micro) - 1):
            logps, _ = completion_logps(model, batch, device)
            losses, reward = kto_loss(logps, ref, batch["label"], kl_t, pref.beta, pref.desirable_weight,
                                      pref.undesirable_weight)
            (losses.sum() * share.scale(weight)).backward()
        part = [float(losses.detach().sum()), *_kto_sums(reward, batch["label"]), *_tokens(batch)]
        sums = [s + weight * v for s, v in zip(sums, part)]
    sums = share.all_sum(sums)
    return {"loss": sums[0] / len(share.window), "kl": kl, **_kto_means(sums[1:7]), "tokens": int(sums[7]),
            "trained_tokens": int(sums[8])}


def _kto_sums(rewards, labels) -> list[float]:
    """[examples, reward sign right (zero wrong), desirable reward sum, desirable count, undesirable sum and count]."""
    import torch

    labels = labels.to(rewards.device)
    right = torch.where(labels, rewards > 0, rewards < 0)
    return [float(rewards.numel()), float(right.sum()), float(rewards[labels].sum()), float(labels.sum()),
            float(rewards[~labels].sum()), float((~labels).sum())]


def _kto_means(sums: list[float]) -> dict[str, float]:
    n, right, good_sum, good, bad_sum, bad = sums
    out = {"reward_accuracy": right / n}
    if good:
        out["reward_desirable"] = good_sum / good
    if bad:
        out["reward_undesirable"] = bad_sum / bad
    if good and bad:
        out["reward_margin"] = out["reward_desirable"] - out["reward_undesirable"]
    return out


def evaluate_preferences(model, reference: Reference, dataset, recipe, device: str, pad_id: int,
                         share: Share | None = None) -> dict[str, float]:
    """Held-out metrics: DPO preference accuracy (ties wrong) and mean margin; KTO reward-sign accuracy and rewards.
    On N ranks (``share``: only its ``world``, ``rank`` and ``all_sum`` are read) each takes its slice of the set.

    Policy and reference both in eval mode (no dropout): the numbers are a property of the weights alone.
    """
    import torch

    from onecard.train.distributed import rank_slices

    world, rank, all_sum = (share.world, share.rank, share.all_sum) if share else (1, 0, _no_sum)
    size = max(1, recipe.training.micro_batch_size)
    collate = collate_dpo if dataset.task == "dpo" else collate_kto
    sums = [0.0] * (4 if dataset.task == "dpo" else 6)
    for part in rank_slices(list(range(len(dataset.examples))), size, world, rank):
        examples = [dataset.examples[i] for i in (part or [0])]
        batch = collate(examples, pad_id)
        ref = _reference_logps(reference, batch, device)
        with torch.no_grad(), eval_mode(model):
            logps, _ = completion_logps(model, batch, device)
        reward = recipe.preference.beta * (logps - ref)
        n = len(examples)
        found = _dpo_sums(reward[:n], reward[n:]) if dataset.task == "dpo" else _kto_sums(reward, batch["label"])
        sums = [s + (1.0 if part else 0.0) * v for s, v in zip(sums, found)]
    sums = all_sum(sums)
    metrics = _dpo_means(sums) if dataset.task == "dpo" else _kto_means(sums)
    return {f"eval_{k}": v for k, v in metrics.items()} | {"eval_examples": len(dataset.examples)}
