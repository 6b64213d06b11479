"""Optimizers and the learning-rate schedule.

The schedule is a pure function of the step (:func:`lr_factor`) applied to ``param_groups`` each step
rather than a ``torch.optim.lr_scheduler`` object, for two reasons: torchao's ``CPUOffloadOptimizer`` is not
a ``torch.optim.Optimizer`` (LR schedulers refuse it), and a pure function makes resume exact with nothing to
restore but the step. After warm-up the formulas are those of transformers'
``get_{cosine,linear,constant}_schedule_with_warmup`` (transformers/optimization.py); a test checks parity. The
warm-up ramp is shifted by one step: transformers' step 0 has factor 0/warmup = 0, an update of nothing whose
loss the next step repeats; here step s < warmup has (s + 1) / (warmup + 1), rising to the peak at step warmup.
"""

from __future__ import annotations

import math
from typing import Any

from onecard.errors import UserError
from onecard.recipe import Recipe

_said_once: set[str] = set()


def _say_once(console, text: str) -> None:
    if text not in _said_once:
        _said_once.add(text)
        if console is not None:
            console.print(f"[dim]{text}[/dim]")


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases and norm scales are not decayed (the usual AdamW practice)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model, recipe: Recipe, device: str, console=None):
    """The optimizer named by ``training.optimizer``, over the trainable parameters only."""
    import torch

    t = recipe.training
    groups = param_groups(model, t.weight_decay)
    if not any(g["params"] for g in groups):
        raise UserError("the model has no trainable parameters", where="method")
    on_cuda = device.startswith("cuda")
    name = t.optimizer
    if name == "adamw_torch_fused":
        if not on_cuda:
            _say_once(console, "adamw_torch_fused: fused AdamW is used on CUDA only; plain AdamW on CPU")
        return torch.optim.AdamW(groups, lr=t.learning_rate, fused=True if on_cuda else None)
    if name == "adamw_torch":
        return torch.optim.AdamW(groups, lr=t.learning_rate)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError(f"optimizer {name} needs the bitsandbytes package", where="training.optimizer",
                            fix="pip install bitsandbytes, or use adamw_torch_fused") from None
        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(groups, lr=t.learning_rate)
    if name == "adamw_cpu_offload":
        return _cpu_offload_optimizer(groups, recipe, on_cuda)
    raise AssertionError(f"unhandled optimizer {name}")  # the recipe schema lists the names


def _cpu_offload_optimizer(groups, recipe: Recipe, on_cuda: bool):
    """torchao's CPUOffloadOptimizer: AdamW state and step on the CPU, weights on the GPU.

    Chosen over DeepSpeed's ZeRO-Offload because it is a drop-in optimizer wrapper (no engine, no launcher)
    from a maintained PyTorch project. It asserts CUDA or XPU (torchao 0.18, checked here: "CPU Offload
    currently only supports CUDA & XPU"), and on a CPU-only machine the state is in CPU memory anyway.
    """
    import torch

    if recipe.method != "full":
        raise UserError("adamw_cpu_offload is for full fine-tuning; adapter optimizer state is already small",
                        where="training.optimizer", fix="use adamw_torch_fused for adapter methods")
    if not on_cuda:
        raise UserError("adamw_cpu_offload moves optimizer state from GPU to CPU; without a GPU there is nothing "
                        "to offload", where="training.optimizer", fix="use adamw_torch (state stays in CPU memory)")
    try:
        from torchao.optim import CPUOffloadOptimizer
    except ImportError:
        raise UserError("adamw_cpu_offload needs torchao", where="training.optimizer",
                        fix="pip install torchao") from None
    return CPUOffloadOptimizer(groups, torch.optim.AdamW, offload_gradients=False, fused=True,
                               lr=recipe.training.learning_rate)


# --------------------------------------------------------------------------- schedule


def warmup_steps(recipe: Recipe, total_steps: int) -> int:
    t = recipe.training
    if t.warmup_steps is not None:
        return t.warmup_steps
    return math.ceil(t.warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based), as transformers' schedules compute it."""
    if step < warmup:  # never 0: see the module docstring
        return float(step + 1) / float(warmup + 1)
    if kind == "constant":
        return 1.0
    progress = float(step - warmup) / float(max(1, total_steps - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":  # num_cycles = 0.5: one half-cosine from 1 to 0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise AssertionError(f"unhandled schedule {kind}")


def set_lr(optimizer, recipe: Recipe, step: int, total_steps: int) -> float:
    lr = recipe.training.learning_rate * lr_factor(step, total_steps, warmup_steps(recipe, total_steps),
                                                   recipe.training.lr_scheduler)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
