"""kernels/cublaslt.py's plan cache on a stand-in for the cuBLASLt library (no GPU here): at most MAX_PLANS plans,
the least recently used dropped first with its descriptor and layouts destroyed, and a shape without a kernel
cached as None without leaking what its query created."""

from __future__ import annotations

import ctypes

import torch

from onecard.kernels import cublaslt


class _FakeFunction:
    def __init__(self, lib, name):
        self.lib, self.name = lib, name

    def __call__(self, *args):
        self.lib.calls.append(self.name)
        if self.name in ("cublasLtMatmulDescCreate", "cublasLtMatrixLayoutCreate"):
            self.lib.handles += 1
            ctypes.c_void_p.from_address(args[0]).value = self.lib.handles  # a distinct non-null handle
        if self.name == "cublasLtMatmulAlgoGetHeuristic":
            ctypes.c_int.from_address(args[9]).value = 0 if self.lib.no_kernel else 1
        if self.name in ("cublasLtMatmulDescDestroy", "cublasLtMatrixLayoutDestroy"):
            self.lib.destroyed.append(args[0])
        return 0


class _FakeLib:
    def __init__(self):
        self.calls, self.destroyed, self.handles, self.no_kernel = [], [], 0, False

    def __getattr__(self, name):
        fn = _FakeFunction(self, name)
        object.__setattr__(self, name, fn)
        return fn


def _plan(lt, m):
    scale = torch.ones(4)
    return lt.plan((0, m, 16, 32, True, False), scale, scale)


def test_least_recently_used_plans_go_with_their_descriptors(monkeypatch):
    monkeypatch.setattr(cublaslt, "MAX_PLANS", 3)
    lib = _FakeLib()
    lt = cublaslt._Lt(lib)
    first = _plan(lt, 1)
    _plan(lt, 2)
    _plan(lt, 3)
    lt.plans.move_to_end((0, 1, 16, 32, True, False))  # what a matmul_into hit does
    _plan(lt, 4)
    assert [k[1] for k in lt.plans] == [3, 1, 4]  # M=2 was the least recently used
    assert len(lib.destroyed) == 4  # its descriptor and three layouts
    assert first.desc.value not in lib.destroyed and _plan(lt, 1) is first  # kept, and not queried again
    assert lib.calls.count("cublasLtMatmulAlgoGetHeuristic") == 4


def test_shape_without_kernel_is_cached_as_none_and_frees_its_objects():
    lib = _FakeLib()
    lib.no_kernel = True
    lt = cublaslt._Lt(lib)
    assert _plan(lt, 7) is None and _plan(lt, 7) is None
    assert lib.calls.count("cublasLtMatmulAlgoGetHeuristic") == 1
    assert len(lib.destroyed) == 4
