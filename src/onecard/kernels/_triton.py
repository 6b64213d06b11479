"""Where the Triton kernels may run, decided once at import time.

Triton's ``@triton.jit`` picks the interpreter or the compiler when the kernel is *decorated*
(``TRITON_INTERPRET=1`` read at import), so the choice is frozen here: Triton runs on CUDA tensors,
or on CPU tensors when this process imported the kernels under ``TRITON_INTERPRET=1`` (tests).
Everywhere else the PyTorch references run, so the ops work on any machine, triton installed or not.
"""

from __future__ import annotations

import contextlib
import os

try:  # triton is optional: CPU-only installs (CI) may lack it
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FORCE_REFERENCE = [False]


@contextlib.contextmanager
def reference_only():
    """Run the PyTorch references inside this block (slow interpreter avoided in model-level tests)."""
    old = _FORCE_REFERENCE[0]
    _FORCE_REFERENCE[0] = True
    try:
        yield
    finally:
        _FORCE_REFERENCE[0] = old


def use_triton(*tensors) -> bool:
    """True when the Triton kernel can run on these tensors (all CUDA, or CPU under the interpreter)."""
    if not HAS_TRITON or _FORCE_REFERENCE[0]:
        return False
    if all(t.is_cuda for t in tensors):
        return not INTERPRET
    return INTERPRET and all(t.device.type == "cpu" for t in tensors)


def next_power_of_2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def row_block(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a one-row-per-program kernel: the whole row in one block.

    Same sizing rule as Liger-Kernel's ``calculate_settings`` (warps grow with the row length).
    """
    block = next_power_of_2(n_cols)
    if block > 65536:
        raise ValueError(f"row of {n_cols} columns is too long for a one-block kernel")
    warps = 4
    if block >= 32768:
        warps = 32
    elif block >= 8192:
        warps = 16
    elif block >= 2048:
        warps = 8
    return block, warps
