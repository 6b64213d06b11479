"""plan/inputs.py planned_attention: ``auto`` plans what the loader will run (train/model.py resolve_attn), eager
for Gemma 2 from the transformers release that dropped its SDPA path, and the plan's activation memory follows; on
the installed transformers the planner's catalog and the loader's class check agree for every family."""

from __future__ import annotations

import pytest

from onecard.catalog.families import FAMILIES
from onecard.catalog.models import resolve_shape
from onecard.plan import inputs


@pytest.mark.parametrize(("version", "expected"), [("5.17.0", "sdpa"), ("5.20.0", "sdpa"), ("5.21.0", "eager"),
                                                   ("5.24.0", "eager"), ("6.0.0.dev0", "eager"), (None, "eager")])
def test_gemma2_auto_follows_the_installed_transformers(monkeypatch, version, expected):
    monkeypatch.setattr(inputs, "installed_transformers", lambda: version)
    assert inputs.planned_attention("auto", resolve_shape("gemma-2-9b")) == expected
    assert inputs.planned_attention("auto", resolve_shape("llama-3-8b")) == "sdpa"
    assert inputs.planned_attention("eager", resolve_shape("llama-3-8b")) == "eager"


def test_eager_gemma2_plans_more_activation_memory(monkeypatch):
    from onecard.plan.memory import plan_memory
    from onecard.recipe import validate_recipe

    recipe = validate_recipe({"model": {"name_or_path": "gemma-2-2b"}, "method": "lora",
                              "data": {"path": "x.jsonl", "seq_len": 4096}, "training": {"micro_batch_size": 2,
                                                                                          "grad_ckpt": False}})
    peaks = {}
    for version in ("5.17.0", "5.24.0"):
        monkeypatch.setattr(inputs, "installed_transformers", lambda v=version: v)
        plan_inputs = inputs.inputs_from_recipe(recipe, gpu="h200")
        peaks[plan_inputs.attn] = plan_memory(plan_inputs).allocator_bytes
    assert peaks["eager"] > peaks["sdpa"]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_the_planner_and_the_loader_agree_on_the_installed_transformers(model_type):
    """The planner reads SDPA support from the catalog (it imports no transformers); the loader asks transformers'
    class. On the installed release they must agree for every catalog family, so a release that drops SDPA from
    another family fails here until catalog/families.py names it (``no_sdpa_since``)."""
    import dataclasses

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from onecard.catalog.models import PRESETS
    from onecard.recipe import validate_recipe
    from onecard.train.model import resolve_attn

    shape = dataclasses.replace(PRESETS["llama-3-8b"], model_type=model_type)
    recipe = validate_recipe({"model": {"name_or_path": "llama-3-8b"}})  # attn_implementation: auto
    loader = resolve_attn(recipe, "cpu", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    assert inputs.planned_attention("auto", shape) == loader
