"""Each lint rule: a recipe that triggers it and one that doesn't."""

from __future__ import annotations

import pytest

from onecard.lint import lint_recipe
from onecard.recipe import load_recipe

NO_POWER = lambda: []  # noqa: E731


def recipe(*sets, model="llama-3-8b"):
    return load_recipe(None, [f"model.name_or_path={model}", *sets])


def ids(rec, **kw):
    kw.setdefault("power_reader", NO_POWER)
    kw.setdefault("version_reader", lambda dist: None)
    return {f.id: f for f in lint_recipe(rec, **kw)}


def test_clean_recipe_has_no_findings():
    assert ids(recipe()) == {}


def test_does_not_fit_and_tight():
    assert ids(recipe("training.micro_batch_size=8", "training.kernels=none"))["does-not-fit"].severity == "error"
    assert "does-not-fit" not in ids(recipe("training.micro_batch_size=1"))
    assert ids(recipe("training.micro_batch_size=5", "training.kernels=liger"))["tight-fit"].severity == "warning"


def test_qlora_optimizer():
    # Gemma 2 27B in NF4 at rank 96: fp32 Adam state for its 0.69 B adapter params pushes it past 24 GiB;
    # with paged 8-bit state it fits (onecard plan: 27.0 vs 21.6 GiB).
    base = ("method=qlora", "model.name_or_path=gemma-2-27b", "plan.gpu=rtx4090", "adapter.rank=96",
            "data.seq_len=512")
    assert "qlora-optimizer" in ids(recipe(*base, "training.optimizer=adamw_torch"))
    assert "qlora-optimizer" not in ids(recipe(*base, "training.optimizer=paged_adamw_8bit"))
    assert "qlora-optimizer" not in ids(recipe("method=qlora", "training.optimizer=adamw_torch"))  # fits anyway


def test_grad_ckpt_off():
    assert "grad-ckpt-off" in ids(recipe("training.grad_ckpt=false", "data.seq_len=4096"))
    assert "grad-ckpt-off" not in ids(recipe("training.grad_ckpt=false", "data.seq_len=1024",
                                             "model.name_or_path=llama-3.2-1b"))
    assert "grad-ckpt-off" not in ids(recipe("training.grad_ckpt=true", "data.seq_len=4096"))


def test_fp8_base_needs_an_fp8_card():
    found = ids(recipe("quant.base=fp8", "plan.gpu=rtx3090", "training.micro_batch_size=1"))["fp8-base-gpu"]
    assert found.severity == "error" and "rtx3090" in found.message
    assert "fp8-base-gpu" not in ids(recipe("quant.base=fp8", "plan.gpu=rtx4090"))
    assert "fp8-base-gpu" not in ids(recipe("plan.gpu=rtx3090", "training.micro_batch_size=1"))


def test_fp8_base_says_what_its_quality_is_known_to_be():
    """Under 1B parameters (the size the protocol measured, SmolLM2-135M) a warning with the measured gap; above, an
    info that says nothing larger is measured; none without an FP8 base."""
    small = ids(recipe("quant.base=fp8", "plan.gpu=rtx4090", model="qwen2.5-0.5b"))["fp8-base-quality"]
    assert small.severity == "warning" and "4.33%" in small.why and "0.49B" in small.message
    large = ids(recipe("quant.base=fp8", "plan.gpu=rtx4090"))["fp8-base-quality"]
    assert large.severity == "info" and "not measured" in large.why and "quant.base: none" in large.fix
    assert "fp8-base-quality" not in ids(recipe("plan.gpu=rtx4090", model="qwen2.5-0.5b"))


def test_lora_dropout_leaves_the_fused_layers():
    found = ids(recipe("adapter.dropout=0.05"))["lora-dropout-unfused"]
    assert found.severity == "warning" and "0.05" in found.message and "adapter.dropout: 0" in found.fix
    assert "lora-dropout-unfused" not in ids(recipe("adapter.dropout=0.05", "training.kernels=none"))
    assert "lora-dropout-unfused" not in ids(recipe("adapter.dropout=0.05", "task=dpo"))  # planned unfused anyway
    assert "lora-dropout-unfused" not in ids(recipe("adapter.dropout=0.05", "method=full"))


def test_fp16():
    assert ids(recipe("model.dtype=float16"))["fp16-unsafe-model"].severity == "error"
    assert "fp16-on-bf16-card" in ids(recipe("model.dtype=float16", model="mistral-7b"))
    assert not {"fp16-unsafe-model", "fp16-on-bf16-card"} & set(ids(recipe("model.dtype=bfloat16")))


def test_lora_targets_from_another_architecture():
    found = ids(recipe("adapter.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]"))
    assert "phi3" in found["lora-targets"].message
    assert "lora-targets" not in ids(recipe("adapter.target_modules=[q_proj,v_proj]"))


def test_lora_targets_read_from_local_config(tiny_llama_dir):
    assert "lora-targets" in ids(recipe("adapter.target_modules=[c_attn]", model=tiny_llama_dir))


def test_flash_attn_version():
    fa = ("model.attn_implementation=flash_attention_2",)
    assert "flash-attn-old" in ids(recipe(*fa), version_reader=lambda d: "2.5.8")
    assert "flash-attn-missing" in ids(recipe(*fa), version_reader=lambda d: None)
    assert not {"flash-attn-old", "flash-attn-missing"} & set(ids(recipe(*fa), version_reader=lambda d: "2.7.4.post1"))
    assert "flash-attn-old" not in ids(recipe(), version_reader=lambda d: "2.5.8")


@pytest.mark.parametrize("sets,rule", [
    (("training.learning_rate=5e-3",), "lr-range"),
    (("training.learning_rate=1e-7",), "lr-range"),
    (("method=full", "model.name_or_path=llama-3.2-1b", "training.learning_rate=2e-4"), "lr-range"),
    (("adapter.rank=2",), "rank-range"),
    (("adapter.rank=512",), "rank-range"),
])
def test_lr_and_rank_ranges(sets, rule):
    assert rule in ids(recipe(*sets))


def test_lr_and_rank_in_range():
    found = ids(recipe("training.learning_rate=2e-4", "adapter.rank=64"))
    assert not {"lr-range", "rank-range"} & set(found)
    assert "lr-range" not in ids(recipe("method=full", "training.learning_rate=2e-5", model="llama-3.2-1b"))


def test_qlora_max_grad_norm():
    assert "qlora-max-grad-norm" in ids(recipe("method=qlora", "training.max_grad_norm=null"))
    assert "qlora-max-grad-norm" not in ids(recipe("method=qlora", "training.max_grad_norm=0.3"))
    assert "qlora-max-grad-norm" not in ids(recipe("method=lora", "training.max_grad_norm=null"))


def test_seq_above_context():
    assert ids(recipe("data.seq_len=16384", "training.micro_batch_size=1"))["seq-above-context"].severity == "error"
    assert "seq-above-context" not in ids(recipe("data.seq_len=16384", model="llama-3.1-8b"))


def test_template_masking_uses_data_helper(tiny_llama_dir):
    from onecard.tiny import build_tiny_tokenizer

    broken = build_tiny_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert "template-masking" in ids(recipe(model=tiny_llama_dir), tokenizer=broken)
    assert "template-masking" not in ids(recipe(model=tiny_llama_dir))  # ChatML from the dir's own tokenizer


def test_template_mismatch(tiny_llama_dir):
    assert "template-mismatch" in ids(recipe("data.chat_template=alpaca", model=tiny_llama_dir))
    assert "template-mismatch" not in ids(recipe("data.chat_template=auto", model=tiny_llama_dir))


def test_power_limit_read_through_injected_nvml():
    capped = lambda: [("NVIDIA GeForce RTX 4090", 300.0, 450.0)]  # noqa: E731
    default = lambda: [("NVIDIA GeForce RTX 4090", 450.0, 450.0)]  # noqa: E731
    assert "power-limit" in ids(recipe(), power_reader=capped)
    assert "power-limit" not in ids(recipe(), power_reader=default)


def test_cli_exit_codes(tmp_path):
    import json
    import subprocess
    import sys

    bad, good = tmp_path / "bad.yaml", tmp_path / "good.yaml"
    bad.write_text("model: {name_or_path: llama-3-8b}\ndata: {seq_len: 16384}\n")
    good.write_text("model: {name_or_path: llama-3-8b}\n")
    cmd = [sys.executable, "-m", "onecard.cli", "lint"]
    proc = subprocess.run(cmd + [str(bad), "--json"], capture_output=True, text=True)
    assert proc.returncode == 1 and json.loads(proc.stdout)["errors"] >= 1
    assert subprocess.run(cmd + [str(good)], capture_output=True, text=True).returncode == 0
