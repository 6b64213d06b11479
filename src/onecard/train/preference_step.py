"""One optimizer step's gradients for DPO and KTO, and held-out preference evaluation.

Normalisation under gradient accumulation follows the spine's rule (train/spine.py): each micro-batch's
*summed* per-pair (DPO) or per-example (KTO) loss is divided by the number in the whole accumulation window, so
the gradient equals that of one batch holding the window, whatever the micro-batch split. trl takes the mean per
micro-batch instead, which differs when the last window of an epoch is short.

KTO's KL reference point is estimated once per window from mismatched pairs of the whole window (trl does it per
device batch, and refuses batch size 1 because the estimate then degenerates into the reward itself). It carries
no gradient, so estimating it over the window keeps micro-batch 1 x accumulation 8 equal to 8 x 1.
"""

from __future__ import annotations

from typing import Any

from onecard.data.preference import collate_dpo, collate_kto, collate_rows, kl_rows
from onecard.train.preference_loss import (completion_logps, dpo_loss, kto_accuracy, kto_kl, kto_loss,
                                           preference_accuracy)
from onecard.train.preference_reference import Reference, eval_mode


def _reference_logps(reference: Reference, batch, device: str):
    import torch

    with torch.no_grad(), reference.active() as ref_model:
        logps, _ = completion_logps(ref_model, batch, device)
    return logps


def _tokens(batch) -> tuple[int, int]:
    return int(batch["attention_mask"].sum()), int((batch["labels"][:, 1:] != -100).sum())


def dpo_step(model, reference: Reference, micro: list[list[dict]], recipe, device: str, pad_id: int) -> dict[str, Any]:
    """Backward over one window of DPO pairs; returns the step's metrics (loss, rewards, margin, accuracy)."""
    import torch

    pref = recipe.preference
    n_pairs = sum(len(examples) for examples in micro)
    loss_sum, chosen, rejected, n_tokens, n_trained = 0.0, [], [], 0, 0
    for examples in micro:
        batch = collate_dpo(examples, pad_id)
        ref = _reference_logps(reference, batch, device)  # first: its activations are gone before the policy's
        logps, counts = completion_logps(model, batch, device)
        n = len(examples)
        terms = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], pref.beta, pref.loss_type, counts[:n], counts[n:])
        (terms.losses.sum() / n_pairs).backward()
        loss_sum += float(terms.losses.detach().sum())
        chosen.append(terms.chosen_rewards)
        rejected.append(terms.rejected_rewards)
        tokens, trained = _tokens(batch)
        n_tokens, n_trained = n_tokens + tokens, n_trained + trained
    chosen_t, rejected_t = torch.cat(chosen), torch.cat(rejected)
    return {"loss": loss_sum / n_pairs, **_dpo_metrics(chosen_t, rejected_t), "tokens": n_tokens,
            "trained_tokens": n_trained}


def _dpo_metrics(chosen, rejected) -> dict[str, float]:
    return {"reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean()),
            "reward_margin": float((chosen - rejected).mean()),
            "reward_accuracy": preference_accuracy(chosen, rejected)}


def window_kl(model, reference: Reference, window: list[dict], chunk: int, device: str, pad_id: int):
    """KTO's KL estimate over the window's mismatched pairs (0 for a window of one: nothing to mismatch)."""
    import torch

    if len(window) < 2:
        return torch.zeros((), device=device)
    rows = kl_rows(window)
    pi, ref = [], []
    for start in range(0, len(rows), chunk):
        batch = collate_rows(rows[start:start + chunk], pad_id)
        with torch.no_grad(), eval_mode(model):
            pi.append(completion_logps(model, batch, device)[0])
        ref.append(_reference_logps(reference, batch, device))
    return kto_kl(torch.cat(pi), torch.cat(ref))


def kto_step(model, reference: Reference, micro: list[list[dict]], recipe, device: str, pad_id: int) -> dict[str, Any]:
    """Backward over one window of KTO examples; returns the step's metrics (loss, KL, rewards, accuracy)."""
    import torch

    pref = recipe.preference
    window = [ex for examples in micro for ex in examples]
    kl = window_kl(model, reference, window, recipe.training.micro_batch_size, device, pad_id)
    loss_sum, rewards, labels, n_tokens, n_trained = 0.0, [], [], 0, 0
    for examples in micro:
        batch = collate_kto(examples, pad_id)
        ref = _reference_logps(reference, batch, device)
        logps, _ = completion_logps(model, batch, device)
        losses, reward = kto_loss(logps, ref, batch["label"], kl, pref.beta, pref.desirable_weight,
                                  pref.undesirable_weight)
        (losses.sum() / len(window)).backward()
        loss_sum += float(losses.detach().sum())
        rewards.append(reward)
        labels.append(batch["label"])
        tokens, trained = _tokens(batch)
        n_tokens, n_trained = n_tokens + tokens, n_trained + trained
    return {"loss": loss_sum / len(window), "kl": float(kl), **_kto_metrics(torch.cat(rewards), torch.cat(labels)),
            "tokens": n_tokens, "trained_tokens": n_trained}


def _kto_metrics(rewards, labels) -> dict[str, float]:
    labels = labels.to(rewards.device)
    out = {"reward_accuracy": kto_accuracy(rewards, labels)}
    if bool(labels.any()):
        out["reward_desirable"] = float(rewards[labels].mean())
    if bool((~labels).any()):
        out["reward_undesirable"] = float(rewards[~labels].mean())
    if "reward_desirable" in out and "reward_undesirable" in out:
        out["reward_margin"] = out["reward_desirable"] - out["reward_undesirable"]
    return out


def evaluate_preferences(model, reference: Reference, dataset, recipe, device: str, pad_id: int) -> dict[str, float]:
    """Held-out metrics: DPO preference accuracy (ties wrong) and mean margin; KTO reward-sign accuracy and rewards.

    Policy and reference both in eval mode (no dropout): the numbers are a property of the weights alone.
    """
    import torch

    size = max(1, recipe.training.micro_batch_size)
    collate = collate_dpo if dataset.task == "dpo" else collate_kto
    parts: list[tuple] = []
    for start in range(0, len(dataset.examples), size):
        examples = dataset.examples[start:start + size]
        batch = collate(examples, pad_id)
        ref = _reference_logps(reference, batch, device)
        with torch.no_grad(), eval_mode(model):
            logps, _ = completion_logps(model, batch, device)
        reward = recipe.preference.beta * (logps - ref)
        n = len(examples)
        parts.append((reward[:n], reward[n:]) if dataset.task == "dpo" else (reward, batch["label"]))
    first, second = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    metrics = _dpo_metrics(first, second) if dataset.task == "dpo" else _kto_metrics(first, second)
    return {f"eval_{k}": v for k, v in metrics.items()} | {"eval_examples": len(dataset.examples)}
