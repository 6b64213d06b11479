"""Emulate a smaller card on a larger one (``--memory-cap-gib``): the same allocator limit for the bench and for
``onecard train``, so a run checked on an H200 under a 24 GiB cap behaves as on a 24 GB card.

``torch.cuda.set_per_process_memory_fraction`` limits only PyTorch's caching allocator; the CUDA context, cuBLAS
handles and loaded kernels live outside it, so the fraction is the cap minus what the process already holds there.
``onecard train --memory-cap-gib`` passes the cap in ``ONECARD_MEMORY_CAP_GIB`` (so the N processes of a multi-GPU
run see it too); the trainer plans for a card of that size (train/stream_setup.py) and applies it before loading.
"""

from __future__ import annotations

import os
from typing import Any

GIB = 2**30
MEMORY_CAP_ENV = "ONECARD_MEMORY_CAP_GIB"


def memory_cap_gib() -> float | None:
    """The cap ``onecard train --memory-cap-gib`` set, or None."""
    value = os.environ.get(MEMORY_CAP_ENV)
    return float(value) if value else None


def non_allocator_bytes() -> int:
    """Device memory this process holds outside PyTorch's caching allocator: CUDA context, cuBLAS/cuDNN handles,
    loaded kernels (lazy module loading grows this as new kernels run). Assumes no other process on the GPU."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return int((total - free) - torch.cuda.memory_reserved())


def apply_memory_cap(cap_gib: float) -> dict[str, Any]:
    """Emulate a card of ``cap_gib`` total memory (module docstring)."""
    import torch

    torch.ones(64, 64, device="cuda") @ torch.ones(64, 64, device="cuda")  # create the cuBLAS handle first
    torch.cuda.synchronize()
    outside = non_allocator_bytes()
    total = torch.cuda.mem_get_info()[1]
    allowed = cap_gib * GIB - outside
    torch.cuda.set_per_process_memory_fraction(max(allowed, 0) / total)
    return {"memory_cap_gib": cap_gib, "non_allocator_gib_at_cap": outside / GIB,
            "allocator_limit_gib": allowed / GIB}


def clear_memory_cap() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(1.0)


def apply_requested_cap(device: str, console=None) -> float | None:
    """At train start: apply the cap ``--memory-cap-gib`` asked for (CUDA only; on the CPU it is refused)."""
    cap = memory_cap_gib()
    if cap is None:
        return None
    if not device.startswith("cuda"):
        from onecard.errors import UserError

        raise UserError("--memory-cap-gib emulates a smaller GPU; this run is on the CPU", where="--memory-cap-gib",
                        fix="drop the option, or run on a CUDA GPU")
    info = apply_memory_cap(cap)
    if console is not None:
        console.print(f"[cyan]memory cap {cap:g} GiB: the allocator may use {info['allocator_limit_gib']:.2f} GiB "
                      f"({info['non_allocator_gib_at_cap']:.2f} GiB already held outside it)[/cyan]")
    return cap
