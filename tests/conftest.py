"""Shared fixtures. GPU tests carry the ``gpu`` marker and skip without CUDA."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # torch missing or broken: no GPU tests either way
    _HAS_CUDA = False
# Triton kernels run under its CPU interpreter without a GPU. Set before any test module imports onecard.kernels:
# Triton reads the variable when a kernel is decorated, so a late setting leaves compiled-mode kernels that fail
# on CPU (seen when test_plan_exact ran before test_patch_families).
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Prepared data goes to a per-session cache, never the user's ~/.cache/onecard/data.
os.environ.setdefault("ONECARD_DATA_CACHE", tempfile.mkdtemp(prefix="onecard-test-data-cache-"))


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """``tiny_model_factory(arch)`` -> path of a saved 2-layer random model + tokenizer (cached per arch)."""
    from onecard.tiny import save_tiny_model

    cache: dict[str, str] = {}

    def make(arch: str = "llama"):
        if arch not in cache:
            cache[arch] = str(save_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch))
        return cache[arch]

    return make


@pytest.fixture()
def tiny_llama_dir(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    """One ``onecard demo`` run per test session, shared by the tests that need it: (run_dir, demo.json).

    ``ONECARD_DEMO_RUN_DIR=DIR`` reuses a finished run there instead of training again.
    """
    shared = os.environ.get("ONECARD_DEMO_RUN_DIR")
    if shared and (Path(shared) / "demo.json").is_file():
        run_dir = Path(shared)
    else:
        from onecard.demo.run import run_demo

        run_dir = tmp_path_factory.mktemp("demo") / "run"
        run_demo(run_dir, steps=20)
    return run_dir, json.loads((run_dir / "demo.json").read_text())
