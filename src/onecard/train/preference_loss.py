"""DPO / IPO / KTO losses on sequence log-probabilities, written to match trl 1.16.0.

trl keeps these formulas inside ``DPOTrainer._compute_loss`` and ``KTOTrainer._compute_loss`` (no standalone
function to import), and the GPU image has no trl, so the few lines are restated here with the trl source they
mirror; ``tests/test_preference_loss.py`` checks them against hand-computed values.
"""

from __future__ import annotations

from dataclasses import dataclass


def completion_logps(model, batch, device: str):
    """Summed log-probability of each row's completion tokens (labels != -100) and the number of those tokens.

    Log-probs come from the next-token shift as in SFT (logits[t] predicts labels[t+1]); float32 log-softmax,
    as trl's ``log_probs`` output of its fused LM head.
    """
    import torch
    import torch.nn.functional as F

    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    logits = model(**inputs, use_cache=False).logits[:, :-1, :].float()
    labels = batch["labels"][:, 1:].to(logits.device)
    mask = labels != -100
    token_nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.clamp(min=0).reshape(-1),
                                reduction="none").view_as(labels)
    logps = -(token_nll * mask).sum(dim=1)
    return logps, mask.sum(dim=1).to(torch.float32)


@dataclass
class DPOTerms:
    losses: object  # per pair, differentiable
    chosen_rewards: object  # beta * (pi_c - ref_c), detached
    rejected_rewards: object


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid",
             chosen_tokens=None, rejected_tokens=None) -> DPOTerms:
    """Per-pair DPO loss (Rafailov et al. 2023, eq. 7) or IPO loss (Azar et al. 2023, eq. 17).

    sigmoid: ``-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` -- trl dpo_trainer.py, loss_type "sigmoid".
    ipo: ``((pi_c - ref_c)/|y_c| - (pi_r - ref_r)/|y_r| - 1/(2 beta))^2`` with log-ratios averaged per completion
    token -- trl's length normalisation (dpo_trainer.py, loss_type "ipo", confirmed with the IPO authors there).
    Rewards are ``beta * log-ratio`` in both cases (trl's ``rewards/chosen``, ``rewards/rejected``).
    """
    import torch.nn.functional as F

    chosen_ratio = pi_chosen - ref_chosen
    rejected_ratio = pi_rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the completion token counts")
        delta = chosen_ratio / chosen_tokens.clamp(min=1.0) - rejected_ratio / rejected_tokens.clamp(min=1.0)
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")  # the recipe schema lists the names
    return DPOTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def kto_kl(pi_mismatched, ref_mismatched):
    """KTO's reference point z_0: mean log-ratio over mismatched (prompt, completion) pairs, clamped at 0, no gradient
    (Ethayarajh et al. 2024, eq. 7; trl kto_trainer.py: ``(KL_logps - ref_KL_logps).mean().detach().clamp(min=0)``)."""
    return (pi_mismatched - ref_mismatched).mean().detach().clamp(min=0)


def kto_loss(pi_logps, ref_logps, desirable, kl, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """Per-example KTO loss and rewards (trl kto_trainer.py, loss_type "kto").

    desirable:   ``w_d * (1 - sigmoid(beta * (log-ratio - kl)))``
    undesirable: ``w_u * (1 - sigmoid(beta * (kl - log-ratio)))``
    ``desirable`` is a bool tensor; reward = ``beta * log-ratio``, detached.
    """
    import torch

    ratio = pi_logps - ref_logps
    good = 1.0 - torch.sigmoid(beta * (ratio - kl))
    bad = 1.0 - torch.sigmoid(beta * (kl - ratio))
    desirable = desirable.to(ratio.device)
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return losses, beta * ratio.detach()


def preference_accuracy(chosen_rewards, rejected_rewards) -> float:
    """Fraction of pairs whose chosen reward is strictly higher (ties count as wrong, as trl's ``rewards/accuracies``)."""
    return float((chosen_rewards > rejected_rewards).float().mean())


def kto_accuracy(rewards, desirable) -> float:
    """Fraction of examples whose reward sign matches the label (zero counts as wrong)."""
    import torch

    desirable = desirable.to(rewards.device)
    right = torch.where(desirable, rewards > 0, rewards < 0)
    return float(right.float().mean())
