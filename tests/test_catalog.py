"""Catalog facts: preset shapes reproduce published parameter counts; GPU rows carry their sources."""

from __future__ import annotations

import pytest

from onecard.catalog.gpus import GPUS, get_gpu, match_device_name
from onecard.catalog.models import PRESETS, ModelShape, resolve_shape
from onecard.errors import UserError

# Published totals (model cards / safetensors metadata on the hub).
PUBLISHED = {
    "llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496, "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824, "mistral-7b": 7_248_023_552, "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664, "gemma-2-9b": 9_241_705_984,
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_params_match_published(preset):
    assert PRESETS[preset].total_params() == PUBLISHED[preset]


def test_every_row_cites_a_source():
    assert all(g.source and g.memory_gib > 0 and g.bf16_dense_tflops > 0 for g in GPUS.values())
    assert all(s.source.startswith("https://huggingface.co/") and s.hub_id for s in PRESETS.values())


def test_geforce_bf16_is_the_fp32_accumulate_rate():
    assert GPUS["rtx4090"].bf16_dense_tflops == pytest.approx(165.2)   # Ada whitepaper, not 330 (sparse / fp16 acc)
    assert GPUS["h100-sxm"].bf16_dense_tflops == pytest.approx(989.4)  # datasheet 1979 is with sparsity


def test_gpu_lookup_and_device_names():
    assert get_gpu("RTX4090") is GPUS["rtx4090"] and get_gpu("4090") is GPUS["rtx4090"]
    assert match_device_name("NVIDIA GeForce RTX 4090").id == "rtx4090"
    assert match_device_name("NVIDIA H200").id == "h200"
    with pytest.raises(UserError):
        get_gpu("voodoo2")


def test_lora_param_count_by_hand():
    s = PRESETS["llama-3-8b"]
    # r x (in + out) per projection, 32 layers: the 41.9M published for r16 on all 7 projections
    assert s.lora_params(16) == 41_943_040
    assert s.lora_params(16, dora=True) - s.lora_params(16) == 32 * (4096 * 2 + 1024 * 2 + 14336 * 2 + 4096)


def test_local_dir_resolves_like_a_preset(tiny_model_factory):
    import json
    from pathlib import Path

    from safetensors import safe_open

    for arch in ("llama", "gemma2"):
        path = Path(tiny_model_factory(arch))
        shape = resolve_shape(str(path))
        assert shape.model_type == json.loads((path / "config.json").read_text())["model_type"]
        with safe_open(str(path / "model.safetensors"), "np") as f:
            n = sum(int(__import__("math").prod(f.get_slice(k).get_shape())) for k in f.keys())
        assert shape.total_params() == n


def test_unknown_model_and_hub_alias():
    assert resolve_shape("meta-llama/Meta-Llama-3-8B-Instruct") is PRESETS["llama-3-8b"]
    with pytest.raises(UserError):
        resolve_shape("not-a-model")


def test_from_config_missing_key_is_user_error():
    with pytest.raises(UserError):
        ModelShape.from_config({"model_type": "llama", "hidden_size": 8})
