"""FP8 base weights through the patch layer, the loader and the bench config (CPU: GEMMs emulated in fp32).

Tolerance: LoRA gradients with the FP8 base against the same model's bf16/fp32 base, cosine >= 0.99 for every
adapter tensor (the quality target's step-0 criterion); loss within 2%.
"""

import _kernel_env  # noqa: F401
import pytest
import torch

from onecard.errors import UserError
from onecard.patch.fp8 import (EMULATE_ENV, FP8_NORM_FLAG, Fp8Linear, apply_fp8_base, block_linear_bytes,
                              check_fp8_device)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(seed=0):
    import transformers
    from peft import LoraConfig, get_peft_model

    from onecard.tiny import tiny_config

    torch.manual_seed(seed)
    cfg = tiny_config("llama", vocab_size=300, intermediate_size=96)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    for name, p in model.named_parameters():  # peft inits B = 0: make the adapters do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _worst_cosine(a, b):
    return min(float(torch.nn.functional.cosine_similarity(a[n].flatten(), b[n].flatten(), 0)) for n in a)


@pytest.mark.parametrize("kernels", ["none", "onecard"])
def test_fp8_base_lora_grads_match_the_dense_base(kernels):
    from onecard.kernels._triton import reference_only
    from onecard.patch import apply_kernels

    model = _lora_model()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with reference_only():
        loss_ref, grads_ref = _loss_and_grads(model, ids)
        handle = apply_fp8_base(model)
        assert handle.patched["fp8_linear"] == 2 * len(TARGETS)
        layer = model.base_model.model.model.layers[0]
        assert isinstance(layer.mlp.down_proj.base_layer, Fp8Linear)
        assert FP8_NORM_FLAG in layer.input_layernorm.__dict__
        kh = apply_kernels(model, kernels)
        loss, grads = _loss_and_grads(model, ids)
    assert abs(loss - loss_ref) <= 0.02 * abs(loss_ref)
    assert set(grads) == set(grads_ref) and all(".lora_" in n for n in grads)
    assert _worst_cosine(grads, grads_ref) >= 0.99
    kh.revert()
    handle.revert()
    assert type(layer.mlp.down_proj.base_layer) is torch.nn.Linear
    assert FP8_NORM_FLAG not in layer.input_layernorm.__dict__


def test_revert_gives_the_fp8_rounded_weights_and_the_adapter_loads_on_a_dense_base(tmp_path):
    from peft import PeftModel

    model = _lora_model()
    dense = model.base_model.model.model.layers[1].self_attn.v_proj.base_layer.weight.detach().clone()
    before = block_linear_bytes(model)
    handle = apply_fp8_base(model)
    rows = sum(m.out_features for m in model.modules() if isinstance(m, Fp8Linear))
    assert block_linear_bytes(model) == before // 4 + 4 * rows  # fp32 -> 1 byte per weight, + fp32 scales
    fp8 = model.base_model.model.model.layers[1].self_attn.v_proj.base_layer
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (dense.shape[0],)
    rounded = fp8.weight.detach().clone()
    assert 0 < float((rounded - dense).abs().max()) <= float(dense.abs().max()) / 16
    model.save_pretrained(tmp_path / "adapter")
    handle.revert()
    assert torch.equal(model.base_model.model.model.layers[1].self_attn.v_proj.base_layer.weight, rounded)
    base = _lora_model().get_base_model()  # a fresh dense base, same seed
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    a = dict(model.named_parameters())
    for name, p in loaded.named_parameters():
        if ".lora_" in name:
            assert torch.equal(p, a[name.replace(".default", ".default")]), name


def test_fp8_refused_on_cpu_unless_emulation_is_asked(monkeypatch):
    monkeypatch.delenv(EMULATE_ENV, raising=False)
    with pytest.raises(UserError, match="compute capability 8.9") as exc:
        check_fp8_device("cpu")
    assert "quant.base" in exc.value.render()
    monkeypatch.setenv(EMULATE_ENV, "1")
    check_fp8_device("cpu")


def test_loader_refuses_before_reading_the_model(monkeypatch, tmp_path):
    from onecard.recipe import validate_recipe
    from onecard.train.model import load_model_and_tokenizer

    monkeypatch.delenv(EMULATE_ENV, raising=False)
    recipe = validate_recipe({"model": {"name_or_path": str(tmp_path / "no-such-model")}, "quant": {"base": "fp8"}})
    with pytest.raises(UserError, match="fp8"):  # not the missing directory: refused first
        load_model_and_tokenizer(recipe, "cpu")


def test_loader_quantises_at_load_with_emulation(monkeypatch, tiny_llama_dir):
    from onecard.recipe import validate_recipe
    from onecard.train.model import load_model_and_tokenizer

    monkeypatch.setenv(EMULATE_ENV, "1")
    recipe = validate_recipe({"model": {"name_or_path": str(tiny_llama_dir), "dtype": "float32"},
                              "quant": {"base": "fp8"}})
    model, _ = load_model_and_tokenizer(recipe, "cpu")
    fp8 = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert fp8 and all(m.weight_fp8.dtype == torch.float8_e4m3fn for m in fp8)
    assert not any(type(m) is torch.nn.Linear and ".layers." in n for n, m in model.named_modules()
                   if "lora_" not in n)
    assert model.onecard_fp8_base.patched["fp8_linear"] == len(fp8)


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_recipe_and_bench_refuse_fp8_with_other_methods(method):
    from onecard.bench.config import BenchConfig
    from onecard.recipe import validate_recipe

    with pytest.raises(UserError, match="fp8"):
        validate_recipe({"model": {"name_or_path": "llama-3-8b"}, "method": method, "quant": {"base": "fp8"}})
    with pytest.raises(UserError, match="FP8"):
        BenchConfig(model="llama-3-8b", method=method, quant_base="fp8")
    cfg = BenchConfig(model="llama-3-8b", quant_base="fp8")
    assert "--quant-base fp8" in cfg.command() and cfg.to_recipe().quant.base == "fp8"


def test_bench_cli_fp8_refused_on_cpu_then_emulated(monkeypatch, tmp_path):
    import json

    from typer.testing import CliRunner

    from onecard.cli import app

    args = ["bench", "--cpu", "--json", "--steps", "1", "--warmup", "0", "--seq", "32", "--quant-base", "fp8"]
    monkeypatch.delenv(EMULATE_ENV, raising=False)
    res = CliRunner().invoke(app, args)  # onecard's main() turns a UserError into exit 2
    assert isinstance(res.exception, UserError) and "compute capability" in str(res.exception)
    monkeypatch.setenv(EMULATE_ENV, "1")
    out = tmp_path / "r.jsonl"
    res = CliRunner().invoke(app, args + ["--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    record = json.loads(out.read_text().splitlines()[0])
    assert record["status"] == "ok" and record["quant_base"] == "fp8" and "--quant-base fp8" in record["config_command"]


def test_linears_whose_dims_scaled_mm_cannot_take_stay_dense():
    import transformers

    from onecard.tiny import tiny_config

    cfg = tiny_config("llama", vocab_size=300, intermediate_size=88)  # 88: not a multiple of 16
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).requires_grad_(False)
    handle = apply_fp8_base(model)
    mlp = model.model.layers[0].mlp
    assert type(mlp.gate_proj) is torch.nn.Linear and type(mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, Fp8Linear)
    assert handle.patched["fp8_linear"] == 2 * 4 and handle.patched["kept_bf16_not_multiple_of_16"] == 2 * 3
    assert "divisible by 16" in handle.notice
    assert FP8_NORM_FLAG not in model.model.layers[0].post_attention_layernorm.__dict__  # gate stays dense


def test_revert_after_peft_wrapped_the_fp8_layers():
    import transformers
    from peft import LoraConfig, get_peft_model

    from onecard.patch.fp8 import fp8_layers_to_device
    from onecard.tiny import tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=300), dtype=torch.float32)
    handle = fp8_layers_to_device(model, "cpu")
    assert handle.patched["fp8_linear"] == 2 * len(TARGETS)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS))
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, Fp8Linear) and q.lora_A["default"].weight.dtype == torch.float32
    handle.revert()
    assert type(q.base_layer) is torch.nn.Linear
