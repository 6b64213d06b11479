"""Every Triton kernel compiles for the GPUs onecard supports, on a machine without one.

The CPU tests run the kernels under Triton's interpreter, which shares nothing with the compiler: a Triton release
that breaks compilation for sm_89 (RTX 4090, L4) or sm_90 (H100, H200) would pass them. ``triton.compile`` with an
explicit ``GPUTarget`` lowers to PTX and runs the bundled ptxas to a cubin without a driver. It runs in a
subprocess because ``TRITON_INTERPRET`` (set for the other tests) is read when a kernel is decorated.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

TARGETS = (89, 90)
# Launch signatures, as the wrappers call them: pointer dtypes, scalar types, and one value per constexpr.
# Kernels called only from other kernels (inlined helpers) are listed with None.
KERNELS = {
    "rms_norm._rms_fwd": ({"X": "*bf16", "W": "*bf16", "Y": "*bf16", "RSTD": "*fp32", "Q": "*fp8e4nv", "S": "*fp32",
                           "stride_x": "i32", "stride_y": "i32", "n_cols": "i32", "eps": "fp32"},
                          {"GEMMA": False, "FP8": True, "BLOCK": 4096}),
    "rms_norm._rms_bwd": ({"DY": "*bf16", "X": "*bf16", "W": "*bf16", "RSTD": "*fp32", "DX": "*bf16",
                           "DW": "*fp32", "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32",
                           "n_rows": "i32", "n_cols": "i32"}, {"rows_per_prog": 4, "GEMMA": True, "BLOCK": 4096}),
    "glu._act_and_grad": None,
    "glu._glu_fwd": ({"G": "*bf16", "U": "*bf16", "H": "*bf16", "n": "i64"}, {"GELU": False, "BLOCK": 1024}),
    "glu._glu_bwd": ({"DH": "*bf16", "G": "*bf16", "U": "*bf16", "H": "*bf16", "DG": "*bf16", "DU": "*bf16",
                      "n": "i64"}, {"GELU": True, "BLOCK": 1024}),
    "glu._glu_fwd_fp8": ({"G": "*bf16", "U": "*bf16", "H": "*bf16", "Q": "*fp8e4nv", "S": "*fp32", "n_cols": "i32"},
                         {"GELU": False, "CHUNK": 1024}),
    "glu._glu_bwd_fp8": ({"DH": "*bf16", "G": "*bf16", "U": "*bf16", "H": "*bf16", "DG": "*bf16", "DU": "*bf16",
                          "CG": "*fp32", "CU": "*fp32", "QG": "*fp8e4nv", "SG": "*fp32", "QU": "*fp8e4nv",
                          "SU": "*fp32", "n_cols": "i32"}, {"GELU": True, "CHUNK": 1024}),
    "fp8.e4m3_rounded": None,
    "fp8.e4m3_scale": None,
    "fp8.e4m3_code": None,
    "fp8._quant_rows": ({"X": "*bf16", "CS": "*fp32", "Q": "*fp8e4nv", "S": "*fp32", "stride_x": "i32",
                         "stride_q": "i32", "n_cols": "i32"}, {"HAS_CS": True, "CHUNK": 2048}),
    "fp8._transpose_bytes": ({"X": "*u8", "Y": "*u8", "n_rows": "i32", "n_cols": "i32"}, {"BLOCK": 64}),
    "rope._rope_kernel": ({"X": "*bf16", "OUT": "*bf16", "COS": "*bf16", "SIN": "*bf16", "seq_len": "i32",
                           "n_heads": "i32", "half": "i32", "sxb": "i32", "sxh": "i32", "sxs": "i32", "sob": "i32",
                           "soh": "i32", "sos": "i32", "scb": "i32", "scs": "i32"},
                          {"BACKWARD": False, "BLOCK_H": 32, "BLOCK_D": 64}),
    "fused_ce._tanh": None,
    "fused_ce._sech2": None,
    "fused_ce._ce_rows": ({"LOGITS": "*bf16", "Y": "*i64", "LOSS": "*fp32", "stride": "i64", "n_cols": "i32",
                           "ignore_index": "i32", "softcap": "fp32"},
                          {"HAS_SOFTCAP": True, "BLOCK": 4096, "N_BLOCKS": 32}),
}


def compile_all() -> dict[str, list[int]]:
    """Compile every launched kernel for every target; {kernel: [targets compiled]}. Fails on an unlisted kernel."""
    import importlib
    import pkgutil

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    import onecard.kernels as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"onecard.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and obj.__module__ == module.__name__:
                found[f"{info.name}.{name}"] = obj
    unlisted = sorted(set(found) - set(KERNELS))
    if unlisted:
        raise AssertionError(f"kernels without a compile signature in tests/test_triton_compile.py: {unlisted}")
    compiled: dict[str, list[int]] = {}
    for key, spec in KERNELS.items():
        if spec is None:
            continue
        types, constexprs = spec
        fn = found[key]
        signature = {p.name: ("constexpr" if p.is_constexpr else types[p.name]) for p in fn.params}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        for cc in TARGETS:
            out = triton.compile(source, target=GPUTarget("cuda", cc, 32))
            assert out.asm["cubin"], f"{key}: no cubin for sm_{cc}"
            compiled.setdefault(key, []).append(cc)
    return compiled


def test_every_kernel_compiles_for_sm89_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns that its default changes in 3.10; keep today's
    here = Path(__file__).parent
    code = f"import sys, json; sys.path.insert(0, {str(here)!r}); import {Path(__file__).stem} as t; " \
           "print(json.dumps(t.compile_all()))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    launched = {k for k, v in KERNELS.items() if v is not None}
    assert set(compiled) == launched
    assert all(v == list(TARGETS) for v in compiled.values())


def test_the_signature_table_names_real_parameters():
    """A renamed kernel argument must fail here, not as a KeyError deep in the compile subprocess."""
    import onecard.kernels  # noqa: F401 -- the interpreter-mode functions keep their Python signatures

    for key, spec in KERNELS.items():
        if spec is None:
            continue
        module, name = key.split(".")
        fn = getattr(importlib.import_module(f"onecard.kernels.{module}"), name)
        params = list(inspect.signature(getattr(fn, "fn", fn)).parameters)
        types, constexprs = spec
        assert set(types) | set(constexprs) == set(params), key
