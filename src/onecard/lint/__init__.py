"""Pre-flight lint: one rule per known fine-tuning mistake, each with an id, a severity, why it matters and the fix.

``lint_recipe`` reads the recipe, the model's config (preset, local config.json or a .gguf header), the data
files (exist, read, one format that fits the task), the memory plan and -- only where they are cheap and local --
the tokenizer, the installed flash_attn version and the card's NVML power limit. With ``data_tokens=True`` (the
lint command) it also measures the examples' token lengths with the model's tokenizer (lint/data.py).
It never imports torch at import time; the tokenizer checks import transformers only when a local tokenizer exists.
``onecard train`` runs it first, against the device it trains on, and stops on errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from onecard.catalog.families import FAMILIES, family_for, is_llama3
from onecard.lint.data import load_local_tokenizer
from onecard.lint.findings import FLASH_ATTN_MIN, Finding
from onecard.versions import installed_version


def read_power_limits() -> list[tuple[str, float, float]]:
    """``(device name, current limit W, default limit W)`` per GPU through NVML; [] when NVML is unavailable."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            out.append((name, pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000,
                        pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle) / 1000))
        pynvml.nvmlShutdown()
        return out
    except Exception:  # no driver / no GPU: the rule does not apply
        return []


def _load_config(recipe) -> dict | None:
    """The model's config as a dict: a local config.json, a .gguf file's header (its shape) or a preset; None for
    a name that is none of these (the model-unknown rule says so)."""
    from dataclasses import asdict

    from onecard.catalog.models import find_preset, read_config, shape_from_gguf

    name = recipe.model.name_or_path
    path = Path(name).expanduser()
    if path.is_dir():
        return read_config(path)
    if path.suffix == ".gguf" and path.is_file():
        return asdict(shape_from_gguf(path))
    preset = find_preset(name)
    if preset is None:
        return None
    return {"model_type": preset.model_type, "vocab_size": preset.vocab_size,
            "max_position_embeddings": preset.max_position_embeddings}


def lint_recipe(recipe, *, tokenizer=None, model_config: dict | None = None,
                power_reader: Callable[[], list] | None = None,
                version_reader: Callable[[str], str | None] | None = None,
                device: str | None = None, data_tokens: bool = False, reports: dict | None = None) -> list[Finding]:
    """All findings for ``recipe`` (errors first). Readers are injectable for tests.

    device: None plans against the recipe's ``plan.gpu``; "cpu" (a CPU run) skips the GPU memory rules and says
    so; a catalog GPU id checks against that card (the one training runs on). data_tokens: measure the examples'
    token lengths (needs the tokenizer); the per-file reports land in ``reports`` (recipe field -> report).
    """
    from onecard.lint.context import LintContext
    from onecard.lint.rules import RULES

    config = model_config if model_config is not None else _load_config(recipe)
    if tokenizer is None:
        tokenizer = load_local_tokenizer(recipe)
    ctx = LintContext(recipe, config, tokenizer, power_reader or read_power_limits,
                      version_reader or installed_version, device=device, data_tokens=data_tokens,
                      data_reports=reports if reports is not None else {})
    findings = [f for rule in RULES for f in rule(ctx)]
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: order[f.severity])


__all__ = ["Finding", "lint_recipe", "FAMILIES", "family_for", "is_llama3", "FLASH_ATTN_MIN"]
