"""Exports reproduce the trained model: merged == adapter (LoRA, DoRA) within 1e-4 in fp32; adapter reloads with peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from onecard_run_fixtures import cli_exit_code as _cli, make_run


@pytest.fixture(scope="module")
def lora_run(tiny_model_factory, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs"), tiny_model_factory("llama"), "lora")


def _logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _adapter_and_base_logits(run, ids):
    import yaml

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    return _adapter_and_base_logits_from(recipe["model"]["name_or_path"], run, ids)


def _adapter_and_base_logits_from(base_dir, run, ids):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_logits = _logits(base, ids)
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    return _logits(model, ids), base_logits


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_fp32_equals_adapter_model(method, tiny_model_factory, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from onecard.export import export_run

    run = make_run(tmp_path, tiny_model_factory("llama"), method)
    result = export_run(run, "merged", tmp_path / "merged", dtype="float32", device="cpu", log=lambda *_: None)
    ids = [5, 17, 42, 99, 3, 250, 7]
    adapter_logits, base_logits = _adapter_and_base_logits(run, ids)
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapter matters: the test can fail
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (_logits(merged, ids) - adapter_logits).abs().max() <= 1e-4
    v = result["verification"]
    assert v["passed"] and v["max_abs_err"] <= 1e-4 and v["adapter_effect_mean_abs"] > 100 * v["tolerance"]
    stored = json.loads((tmp_path / "merged" / "export.json").read_text())
    assert stored["verification"]["max_abs_err"] == v["max_abs_err"]
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_merged_bf16_is_sharded_and_bf16(lora_run, tmp_path):
    from safetensors import safe_open

    from onecard.export import export_run

    result = export_run(lora_run, "merged", tmp_path / "m", max_shard_size="100KB", device="cpu", log=lambda *_: None)
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "m" / "model.safetensors.index.json").is_file()
    with safe_open(str(shards[0]), "pt") as f:
        assert str(f.get_tensor(next(iter(f.keys()))).dtype) == "torch.bfloat16"
    assert result["stored_dtype"] == "bfloat16" and result["verification"]["passed"]


def test_adapter_export_reloads_with_plain_peft(lora_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onecard.export import export_run

    out = tmp_path / "adapter"
    result = export_run(lora_run, "adapter", out, device="cpu", log=lambda *_: None)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert result["verification"]["max_abs_err"] == 0.0
    ids = [1, 2, 3, 40, 50]
    expected, _ = _adapter_and_base_logits(lora_run, ids)
    base_dir = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), str(out))
    assert torch.equal(_logits(model.eval(), ids), expected)
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_mismatch_fails_the_export(lora_run, tmp_path, monkeypatch):
    import torch

    from onecard.export import ExportMismatch, export_run
    from onecard.export import merged as merged_mod

    original = merged_mod.write_merged

    def corrupt(model, tokenizer, out, dtype="bfloat16", max_shard_size="5GB"):
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.mul_(3.0)
        return original(model, tokenizer, out, dtype, max_shard_size)

    monkeypatch.setattr(merged_mod, "write_merged", corrupt)
    with pytest.raises(ExportMismatch) as err:
        export_run(lora_run, "merged", tmp_path / "bad", dtype="float32", device="cpu", log=lambda *_: None)
    assert not err.value.result["verification"]["passed"]
    assert json.loads((tmp_path / "bad" / "export.json").read_text())["verification"]["passed"] is False


def test_qlora_merge_uses_the_unquantised_base_and_says_so(tiny_model_factory, tmp_path):
    from onecard.export import export_run

    run = make_run(tmp_path, tiny_model_factory("llama"), "qlora")
    result = export_run(run, "merged", tmp_path / "m", dtype="float32", device="cpu", log=lambda *_: None)
    assert any("QLoRA" in n and "unquantised" in n for n in result["notes"])
    assert result["verification"]["passed"] and result["method"] == "qlora"


def test_export_cli_json_and_mismatch_exit_code(lora_run, tmp_path, monkeypatch, capsys):
    from onecard.cli import main
    from onecard.export import verify

    def cli(args):
        try:
            main(args)
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    assert cli(["export", str(lora_run), "--format", "adapter", "--out", str(tmp_path / "a"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verification"]["passed"]
    assert cli(["export", str(lora_run), "--format", "adapter", "--out", str(tmp_path / "a")]) == 2  # not empty
    monkeypatch.setitem(verify.TOLERANCE, "bfloat16", 0.0)  # bf16 rounding now counts as a mismatch
    assert cli(["export", str(lora_run), "--format", "merged", "--out", str(tmp_path / "m")]) == 1
    assert "failed verification" in capsys.readouterr().out



def _with_data_and_results(run, tmp_path):
    """A run directory as training leaves it: the recipe names its data; metrics, summary and eval.json exist."""
    import yaml
    from onecard_run_fixtures import write_metrics
    from test_report import EVAL

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["data"] = {"path": str(tmp_path / "house-style.jsonl"), "seq_len": 96}
    recipe["training"] = {"learning_rate": 3.5e-4, "max_steps": 20}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    write_metrics(run, steps=20)
    (run / "eval.json").write_text(json.dumps(EVAL), encoding="utf-8")
    return recipe


def test_adapter_export_writes_a_real_model_card(tiny_model_factory, tmp_path):
    """onecard export --format adapter: README.md names base, data, recipe, metrics and version (not peft's template)."""
    from huggingface_hub import ModelCard

    import onecard

    run = make_run(tmp_path, tiny_model_factory("llama"), "lora")
    recipe = _with_data_and_results(run, tmp_path)
    out = tmp_path / "adapter"
    assert _cli(["export", str(run), "--format", "adapter", "--out", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and "onecard" in card.data.tags
    assert card.data.base_model is None  # a local path is no Hub id: the Hub rejects it in base_model
    assert "[More Information Needed]" not in card.text  # peft's blank template is gone
    summary = json.loads((run / "summary.json").read_text())
    export = json.loads((out / "export.json").read_text())
    for needle in (recipe["model"]["name_or_path"], "house-style.jsonl", "sequence length 96", "0.00035",
                   "rank / alpha / dropout | 4 / 8 / 0", f"{summary['final_loss']:.4g}", f"onecard {onecard.__version__}",
                   "| exact match | 0.0% | 50.0% |", f"max |Δ| {export['verification']['max_abs_err']:.3g}", "**passed**"):
        assert needle in card.text, needle
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == recipe["model"]["name_or_path"]
    assert "README.md" in export["files"]


def test_gguf_base_is_named_by_its_file_not_the_cache(tiny_model_factory, tmp_path, monkeypatch):
    """A .gguf base: adapter_config and the card name the .gguf file; the card's loading code reproduces the export."""
    import torch
    import yaml
    from peft import PeftModel
    from test_gguf_import import write_tiny_llama_gguf
    from transformers import AutoModelForCausalLM

    from onecard.cache import cache_root as onecard_cache

    def cache_root():
        return onecard_cache() / "gguf"  # where the dequantised copies of .gguf files go

    pytest.importorskip("gguf")
    monkeypatch.setenv("ONECARD_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_model_factory("llama")
    gguf_path = write_tiny_llama_gguf(Path(model_dir), tmp_path / "tiny.gguf")
    run = make_run(tmp_path, model_dir, "lora")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["name_or_path"] = str(gguf_path)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = tmp_path / "adapter"
    assert _cli(["export", str(run), "--format", "adapter", "--out", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    readme = (out / "README.md").read_text()
    assert config["base_model_name_or_path"] == str(gguf_path)
    assert str(cache_root()) not in readme and str(cache_root()) not in json.dumps(config)
    assert cache_root().is_dir()  # the base really went through the cache, which the export no longer names
    snippet = f'from_pretrained("{gguf_path.parent}", gguf_file="{gguf_path.name}"'
    assert snippet in readme
    base = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = [3, 14, 15, 92, 65]
    expected, _ = _adapter_and_base_logits_from(model_dir, run, ids)
    assert (_logits(model, ids) - expected).abs().max() <= 1e-4
