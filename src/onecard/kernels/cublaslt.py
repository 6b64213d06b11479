"""An FP8 GEMM that adds into its output: cuBLASLt's D = op(A) op(B) + beta C with row-wise scales, through ctypes.

    out (+)= diag(a_scale) (a_q w_rows^T) diag(w_scale)      a_q (M x K), w_rows (N x K): e4m3, row-major; out bf16

Why by hand: torch._scaled_mm, the maintained entry to these cuBLASLt kernels, takes no C and no beta, so an FP8
frozen GEMM cannot accumulate onto the adapter's rank-r term the way the bf16 path's ``addmm_`` does (cuBLAS reads C
in the GEMM's epilogue). Adding afterwards reads and writes the whole output once more: on the Llama 3 8B FP8 step
that was the LoRA outputs' ``badd`` GEMMs and the input gradients' elementwise adds, ~85 ms of 0.95 s
(bench/results/profile_fp8_pair_2026-12-03.json). torchao's float8 training and Unsloth's FP8 LoRA call
torch._scaled_mm or fbgemm, neither with an accumulating output; TransformerEngine's GEMM has one
(``accumulate=True``) but is a CUDA-version-bound build the GPU machine lacks. The library is the one torch already
loaded (found in /proc/self/maps), so this calls the same cuBLASLt build _scaled_mm uses.

Column-major, as cuBLASLt sees it: out (M x N row-major) is D (N x M column-major, ld N) = op(A) op(B) with
A = w_rows read as (K x N, ld K) and transposed, B = a_q read as (K x M, ld K): the "TN" layout FP8 needs on
Hopper and Ada. Scales: OUTER_VEC_32F, A's over op(A)'s N rows (w_scale), B's over op(B)'s M columns (a_scale).
Enum values from cuBLAS 13.1's cublasLt.h / cublas_api.h and CUDA's library_types.h.

:func:`matmul_into` returns False where the library or a kernel for the shape is missing; the caller then adds
after torch._scaled_mm and says so once (kernels/fp8.py).
"""

from __future__ import annotations

import collections
import ctypes
import logging

import torch

log = logging.getLogger("onecard.kernels")

_CUDA_R_32F, _CUDA_R_16BF, _CUDA_R_8F_E4M3 = 0, 14, 28  # cudaDataType_t
_COMPUTE_32F = 68  # cublasComputeType_t
_OP_T, _OP_N = 1, 0
_DESC_TRANSA, _DESC_TRANSB = 3, 4  # cublasLtMatmulDescAttributes_t
_DESC_A_SCALE_POINTER, _DESC_B_SCALE_POINTER = 17, 18
_DESC_FAST_ACCUM = 25
_DESC_A_SCALE_MODE, _DESC_B_SCALE_MODE = 31, 32
_SCALE_OUTER_VEC_32F = 3  # cublasLtMatmulMatrixScale_t
_PREF_MAX_WORKSPACE_BYTES = 1  # cublasLtMatmulPreferenceAttributes_t
_WORKSPACE_BYTES = 32 << 20  # what torch gives cuBLASLt on Hopper (CUBLASLT_WORKSPACE_SIZE's default there)


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_VP, _INT = ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {  # every argument typed: sizes are size_t and dims 64-bit, which untyped ctypes would pass as int
    "cublasLtCreate": [_VP],
    "cublasLtMatmulDescCreate": [_VP, _INT, _INT],
    "cublasLtMatmulDescSetAttribute": [_VP, _INT, _VP, ctypes.c_size_t],
    "cublasLtMatrixLayoutCreate": [_VP, _INT, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
    "cublasLtMatmulPreferenceCreate": [_VP],
    "cublasLtMatmulPreferenceSetAttribute": [_VP, _INT, _VP, ctypes.c_size_t],
    "cublasLtMatmulPreferenceDestroy": [_VP],
    "cublasLtMatmulAlgoGetHeuristic": [_VP, _VP, _VP, _VP, _VP, _VP, _VP, _INT, _VP, _VP],
    "cublasLtMatmul": [_VP] * 14 + [ctypes.c_size_t, _VP],
    "cublasLtMatmulDescDestroy": [_VP],
    "cublasLtMatrixLayoutDestroy": [_VP],
}
# Plans kept, least recently used dropped first: batches padded to their longest row bring a new token count M most
# steps, and each plan holds a descriptor and three layouts on the host.
MAX_PLANS = 256


def _address(value) -> int:
    return ctypes.addressof(value)


class _Plan:
    """One shape's descriptor, layouts and algorithm, and two reusable cells that hold the call's scale pointers
    while cublasLtMatmulDescSetAttribute copies them into the descriptor."""

    __slots__ = ("desc", "a", "b", "d", "algo_address", "w_scale_cell", "a_scale_cell", "beta_address", "_keep")

    def __init__(self, desc, a, b, d, heuristic: "_Heuristic", beta):
        self.desc, self.a, self.b, self.d = desc, a, b, d
        self.algo_address = _address(heuristic.algo)
        self.w_scale_cell, self.a_scale_cell = ctypes.c_void_p(), ctypes.c_void_p()
        self.beta_address = _address(beta)
        self._keep = heuristic  # the algorithm struct must outlive the plan


_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)
_ONE_ADDRESS = _address(_ONE)
_POINTER_BYTES = ctypes.sizeof(ctypes.c_void_p)


class _Lt:
    """The loaded library, one handle, and per (device, M, N, K, accumulate, fast_accum) a :class:`_Plan`.

    The per-call path is kept to three ctypes calls (two scale pointers, the matmul) with every other argument
    resolved when the plan is made: at Qwen 2.5 14B's micro-batch 2 an FP8 LoRA step is bound by the host, ~900 of
    these calls a step (bench/results/host_overhead_14b_2026-12-04*)."""

    def __init__(self, lib: ctypes.CDLL):
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, _INT
        self.lib = lib
        self.handle = ctypes.c_void_p()
        self._check(lib.cublasLtCreate(_address(self.handle)), "cublasLtCreate")
        self.plans: collections.OrderedDict = collections.OrderedDict()
        self.workspaces: dict = {}
        self.set_attribute, self.matmul = lib.cublasLtMatmulDescSetAttribute, lib.cublasLtMatmul

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} returned cuBLAS status {status}")

    def _set(self, desc, attr: int, value) -> None:
        self._check(self.set_attribute(desc, attr, _address(value), ctypes.sizeof(value)),
                    f"cublasLtMatmulDescSetAttribute({attr})")

    def _layout(self, dtype: int, rows: int, cols: int, ld: int):
        layout = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatrixLayoutCreate(_address(layout), dtype, rows, cols, ld),
                    "cublasLtMatrixLayoutCreate")
        return layout

    def plan(self, key, w_scale: torch.Tensor, a_scale: torch.Tensor) -> _Plan | None:
        """The plan for ``key``, or None when cuBLASLt has no kernel for it. The scale pointers are set before the
        heuristic query: with them unset cuBLASLt offers no outer-vector algorithm."""
        if key in self.plans:
            return self.plans[key]
        _, m, n, k, accumulate, fast_accum = key
        desc = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatmulDescCreate(_address(desc), _COMPUTE_32F, _CUDA_R_32F),
                    "cublasLtMatmulDescCreate")
        self._set(desc, _DESC_TRANSA, ctypes.c_int32(_OP_T))
        self._set(desc, _DESC_TRANSB, ctypes.c_int32(_OP_N))
        self._set(desc, _DESC_A_SCALE_MODE, ctypes.c_int32(_SCALE_OUTER_VEC_32F))
        self._set(desc, _DESC_B_SCALE_MODE, ctypes.c_int32(_SCALE_OUTER_VEC_32F))
        self._set(desc, _DESC_FAST_ACCUM, ctypes.c_int8(1 if fast_accum else 0))
        self._set(desc, _DESC_A_SCALE_POINTER, ctypes.c_void_p(w_scale.data_ptr()))
        self._set(desc, _DESC_B_SCALE_POINTER, ctypes.c_void_p(a_scale.data_ptr()))
        a = self._layout(_CUDA_R_8F_E4M3, k, n, k)
        b = self._layout(_CUDA_R_8F_E4M3, k, m, k)
        d = self._layout(_CUDA_R_16BF, n, m, n)
        pref = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatmulPreferenceCreate(_address(pref)), "cublasLtMatmulPreferenceCreate")
        ws = ctypes.c_uint64(_WORKSPACE_BYTES)
        self._check(self.lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE_BYTES, _address(ws),
                                                                  ctypes.sizeof(ws)), "preference")
        result, count = _Heuristic(), ctypes.c_int(0)
        status = self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, a, b, d, d, pref, 1, _address(result),
                                                         _address(count))
        self.lib.cublasLtMatmulPreferenceDestroy(pref)
        found = status == 0 and count.value > 0
        self.plans[key] = _Plan(desc, a, b, d, result, _ONE if accumulate else _ZERO) if found else None
        if not found:
            log.warning("cuBLASLt has no FP8 outer-vector-scaled kernel for M=%d N=%d K=%d (heuristic status %d, "
                        "%d algorithms)", m, n, k, status, count.value)
            self._destroy(desc, a, b, d)
        while len(self.plans) > MAX_PLANS:
            old = self.plans.popitem(last=False)[1]
            if old is not None:  # queued GEMMs do not read it again: torch destroys its own when the call returns
                self._destroy(old.desc, old.a, old.b, old.d)
        return self.plans[key]

    def _destroy(self, desc, *layouts) -> None:
        self._check(self.lib.cublasLtMatmulDescDestroy(desc), "cublasLtMatmulDescDestroy")
        for layout in layouts:
            self._check(self.lib.cublasLtMatrixLayoutDestroy(layout), "cublasLtMatrixLayoutDestroy")

    def workspace_address(self, device_index: int) -> int:
        if device_index not in self.workspaces:
            self.workspaces[device_index] = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8,
                                                        device=torch.device("cuda", device_index))
        return self.workspaces[device_index].data_ptr()


def _load() -> _Lt | None:
    """The cuBLASLt torch loaded (it is linked into torch's CUDA library), or None."""
    torch.cuda.init()
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libcublasLt.so" in line})
        return _Lt(ctypes.CDLL(paths[0])) if paths else None
    except (OSError, RuntimeError, AttributeError) as err:  # no /proc (not Linux), an old library without a symbol
        log.warning("cuBLASLt could not be loaded for the accumulating FP8 GEMM: %s", err)
        return None


_STATE: dict = {}


def matmul_into(out: torch.Tensor, a_q: torch.Tensor, a_scale: torch.Tensor, w_rows: torch.Tensor,
                w_scale: torch.Tensor, accumulate: bool, fast_accum: bool = False) -> bool:
    """out (+)= diag(a_scale) (a_q w_rows^T) diag(w_scale) on CUDA, in place; False (nothing done) where cuBLASLt
    or a kernel for this shape is missing. All contiguous: a_q (M x K), w_rows (N x K) e4m3; a_scale (M) and
    w_scale (N) fp32; out (M x N) bf16."""
    lt = _STATE.get("lt", False)
    if lt is False:
        lt = _STATE["lt"] = _load()
    if lt is None:
        return False
    m, k = a_q.shape
    n = w_rows.shape[0]
    if not (out.is_contiguous() and a_q.is_contiguous() and w_rows.is_contiguous() and out.shape == (m, n)
            and out.dtype == torch.bfloat16 and w_rows.shape[1] == k):
        raise ValueError(f"matmul_into: contiguous (M x K) @ (N x K)^T into bf16 (M x N); got {tuple(a_q.shape)}, "
                         f"{tuple(w_rows.shape)} into {tuple(out.shape)} {out.dtype}")
    device_index = out.get_device()
    key = (device_index, m, n, k, accumulate, fast_accum)
    plan = lt.plans.get(key)
    if plan is None:
        plan = lt.plan(key, w_scale, a_scale)
        if plan is None:
            return False
    else:
        lt.plans.move_to_end(key)
    plan.w_scale_cell.value, plan.a_scale_cell.value = w_scale.data_ptr(), a_scale.data_ptr()
    set_attribute, desc = lt.set_attribute, plan.desc
    status = set_attribute(desc, _DESC_A_SCALE_POINTER, _address(plan.w_scale_cell), _POINTER_BYTES) or \
        set_attribute(desc, _DESC_B_SCALE_POINTER, _address(plan.a_scale_cell), _POINTER_BYTES)
    # the raw current stream, as Triton's launcher reads it (torch.cuda.current_stream builds a Stream object)
    stream = torch._C._cuda_getCurrentRawStream(device_index)
    status = status or lt.matmul(lt.handle, desc, _ONE_ADDRESS, w_rows.data_ptr(), plan.a, a_q.data_ptr(), plan.b,
                                 plan.beta_address, out.data_ptr(), plan.d, out.data_ptr(), plan.d,
                                 plan.algo_address, lt.workspace_address(device_index), _WORKSPACE_BYTES, stream)
    lt._check(status, "cublasLtMatmul (or setting its scale pointers)")
    return True
