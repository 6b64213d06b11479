"""Shared by tests/test_kernels_*.py and test_patch_*.py: run Triton kernels under the CPU interpreter.

Must run before ``onecard.kernels`` is first imported (Triton reads TRITON_INTERPRET when a kernel
is decorated). On a CUDA machine the env var is left alone so the compiled kernels are tested.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def assert_close_rel(a, b, tol: float, what: str = ""):
    assert not torch.isnan(a).any(), f"{what}: NaN"
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def triton_active() -> bool:
    from onecard.kernels._triton import HAS_TRITON, INTERPRET

    return HAS_TRITON and (INTERPRET or torch.cuda.is_available())
