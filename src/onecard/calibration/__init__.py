"""Calibration data: measured throughput rows (JSON beside this file) and their loader.

The rows are data, not code, so ``onecard bench`` can append measurements and a reviewer can see where every
efficiency comes from. Efficiencies are *derived* from the rows with onecard.plan.flops (see plan/speed.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

PROFILE_PATH = Path(__file__).with_name("measurements.json")


@dataclass(frozen=True)
class Measurement:
    id: str
    gpu: str
    model: str
    method: str
    rank: int
    seq_len: int
    micro_batch: int
    grad_ckpt: bool
    kernels: str            # none | liger | unsloth | onecard
    tokens_per_s: float
    date: str
    source: str
    targets: str = "all-linear"
    attn: str = "sdpa"
    offload_activations: bool = False  # checkpoints offloaded to host memory (split halves with onecard's kernels)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    measurements: tuple[Measurement, ...]
    memory_bound_share: float        # for a kernel class without a fitted share of its own
    memory_bound_why: str
    path: str
    memory_bound_by_kernels: dict = field(default_factory=dict)  # kernel class -> share fitted from card pairs

    def memory_bound_share_for(self, kernel_class: str) -> float:
        return self.memory_bound_by_kernels.get(kernel_class, self.memory_bound_share)


_FIELDS = ("id", "gpu", "model", "method", "rank", "seq_len", "micro_batch", "grad_ckpt", "kernels", "tokens_per_s",
           "date", "source", "targets", "attn", "offload_activations")


@lru_cache(maxsize=8)
def load_profile(path: str | None = None) -> Profile:
    """Read a calibration profile (default: the one shipped with onecard)."""
    from onecard.errors import UserError

    src = Path(path) if path else PROFILE_PATH
    try:
        raw = json.loads(src.read_text(encoding="utf-8"))
        rows = tuple(Measurement(**{k: r[k] for k in _FIELDS if k in r},
                                 extra={k: v for k, v in r.items() if k not in _FIELDS}) for r in raw["measurements"])
        share = raw["memory_bound_share"]
        fitted = {k: float(v["value"]) for k, v in share.get("by_kernels", {}).items()}
        return Profile(rows, float(share["value"]), str(share.get("why", "")), str(src), fitted)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"cannot read calibration profile: {exc}", where=str(src),
                        fix="restore the shipped file or fix its JSON (schema: see measurements.json)") from None
