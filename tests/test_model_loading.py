"""Model loading: safetensors-only, explicit dtype, fp16 refusals, LoRA targets, seeds, QLoRA, init_adapter."""

from __future__ import annotations

import os

import pytest

from onecard.errors import UserError

os.environ.setdefault("OMP_NUM_THREADS", "1")


def recipe(model_dir, method="lora", **sections):
    from onecard.recipe import validate_recipe

    tree = {"model": {"name_or_path": str(model_dir)}, "method": method, "quant": {"compute_dtype": "float32"}}
    for key, value in sections.items():
        tree[key] = value
    return validate_recipe(tree)


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_missing_directory_names_the_path(tmp_path):
    from onecard.train.model import load_model_and_tokenizer

    with pytest.raises(UserError, match="model directory not found") as exc:
        load_model_and_tokenizer(recipe(tmp_path / "absent"), "cpu")
    assert "absent" in exc.value.render()


def test_unreachable_hub_id_is_a_user_error():
    from onecard.train.model import load_model_and_tokenizer

    os.environ["HF_HUB_OFFLINE"] = "1"
    with pytest.raises(UserError, match="neither a local directory nor a reachable hub id"):
        load_model_and_tokenizer(recipe("someone/not-a-model-xyz"), "cpu")


def test_missing_gguf_file(tmp_path):
    from onecard.train.model import load_model_and_tokenizer

    with pytest.raises(UserError, match="GGUF file not found"):
        load_model_and_tokenizer(recipe(tmp_path / "m.gguf"), "cpu")


def test_pickle_only_directory_needs_allow_pickle(tmp_path, tiny_llama_dir):
    import shutil

    import torch
    from safetensors.torch import load_file

    from onecard.train.model import load_model_and_tokenizer

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, pickled)
    weights = pickled / "model.safetensors"
    torch.save(load_file(str(weights)), pickled / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(UserError, match="allow_pickle"):
        load_model_and_tokenizer(recipe(pickled), "cpu")
    model, _ = load_model_and_tokenizer(recipe(pickled, model={"name_or_path": str(pickled), "allow_pickle": True}),
                                        "cpu")
    reference = load_file(str(tiny_llama_dir + "/model.safetensors"))
    loaded = model.get_base_model().model.embed_tokens.weight
    assert torch.equal(loaded, reference["model.embed_tokens.weight"])


def test_dtype_explicit_fp32_on_cpu_even_for_bf16_checkpoint(tmp_path, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onecard.train.model import load_model_and_tokenizer

    bf16_dir = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(bf16_dir)
    model, _ = load_model_and_tokenizer(recipe(bf16_dir, method="full"), "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config._attn_implementation == "sdpa"
    model, _ = load_model_and_tokenizer(recipe(bf16_dir, method="full", model={"name_or_path": str(bf16_dir),
                                                                                "dtype": "bfloat16"}), "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("config,needle", [
    ({"model_type": "llama", "vocab_size": 128256}, "Llama 3"),
    ({"model_type": "gemma2", "vocab_size": 256000}, "Gemma 2"),
])
def test_fp16_refused_for_llama3_and_gemma2(tiny_llama_dir, config, needle):
    import torch

    from onecard.train.model import resolve_dtype

    r = recipe(tiny_llama_dir, model={"name_or_path": tiny_llama_dir, "dtype": "float16"})
    with pytest.raises(UserError, match=needle):
        resolve_dtype(r, "cuda", config)
    assert resolve_dtype(r, "cuda", {"model_type": "llama", "vocab_size": 32000}) == torch.float16
    auto = recipe(tiny_llama_dir)
    assert resolve_dtype(auto, "cuda", config) == torch.bfloat16
    assert resolve_dtype(auto, "cpu", config) == torch.float32


def test_unknown_architecture_lists_linear_modules(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from onecard.train.model import target_modules

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.config.model_type = "mystery"
    with pytest.raises(UserError, match="no published LoRA targets") as exc:
        target_modules(model, recipe(tiny_llama_dir))
    for name in ("q_proj", "down_proj"):
        assert name in exc.value.render()
    assert "lm_head" not in exc.value.render()


def test_explicit_targets_checked_and_applied(tiny_llama_dir):
    from onecard.train.model import load_model_and_tokenizer

    bad = recipe(tiny_llama_dir, adapter={"target_modules": ["q_proj", "query_key_value"]})
    with pytest.raises(UserError, match="query_key_value") as exc:
        load_model_and_tokenizer(bad, "cpu")
    assert "v_proj" in exc.value.render()
    model, _ = load_model_and_tokenizer(recipe(tiny_llama_dir, adapter={"target_modules": ["v_proj"]}), "cpu")
    names = trainable(model)
    assert names and all("v_proj.lora_" in n for n in names)


def test_auto_targets_all_linear_layers_and_base_frozen(tiny_model_factory):
    from onecard.train.model import load_model_and_tokenizer

    for arch in ("qwen2", "gemma"):
        model, _ = load_model_and_tokenizer(recipe(tiny_model_factory(arch)), "cpu")
        adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable(model)}
        assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert all(".lora_" in n for n in trainable(model))


def test_seed_applied_before_adapter_init(tiny_llama_dir):
    import torch

    from onecard.train.model import load_model_and_tokenizer

    def lora_a(seed):
        model, _ = load_model_and_tokenizer(recipe(tiny_llama_dir, training={"seed": seed}), "cpu")
        return {n: p.detach().clone() for n, p in trainable(model).items() if "lora_A" in n}

    torch.manual_seed(123)  # the global state before loading must not matter
    a = lora_a(1)
    torch.manual_seed(999)
    b = lora_a(1)
    c = lora_a(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_methods_full_qlora_dora(tiny_llama_dir):
    import bitsandbytes as bnb

    from onecard.train.model import load_model_and_tokenizer

    full, _ = load_model_and_tokenizer(recipe(tiny_llama_dir, method="full"), "cpu")
    assert all(p.requires_grad for p in full.parameters())
    qlora, _ = load_model_and_tokenizer(recipe(tiny_llama_dir, method="qlora"), "cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in qlora.modules())
    assert all(".lora_" in n for n in trainable(qlora))
    dora, _ = load_model_and_tokenizer(recipe(tiny_llama_dir, method="dora"), "cpu")
    assert any("lora_magnitude_vector" in n for n in trainable(dora))


def test_init_adapter_loads_trainable(tmp_path, tiny_llama_dir):
    import torch

    from onecard.train.model import load_model_and_tokenizer

    first, tok = load_model_and_tokenizer(recipe(tiny_llama_dir), "cpu")
    with torch.no_grad():
        for name, param in trainable(first).items():
            param.add_(0.5)
    run_dir = tmp_path / "run"
    first.save_pretrained(run_dir / "adapter")
    again, _ = load_model_and_tokenizer(recipe(tiny_llama_dir, adapter={"init_adapter": str(run_dir)},
                                               training={"seed": 77}), "cpu")
    want, got = trainable(first), trainable(again)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(UserError, match="adapter_config.json"):
        load_model_and_tokenizer(recipe(tiny_llama_dir, adapter={"init_adapter": str(tmp_path)}), "cpu")


def test_auto_attention_falls_to_eager_where_the_class_has_no_sdpa(monkeypatch, caplog):
    """transformers 5.24 has no SDPA path for Gemma 2 (5.17 had one): auto picks eager and says so, an explicit
    sdpa is refused before loading; a class with SDPA keeps it."""
    import transformers

    from onecard.train.model import resolve_attn

    auto, sdpa = recipe("m"), recipe("m", model={"name_or_path": "m", "attn_implementation": "sdpa"})
    assert resolve_attn(auto, "cpu", "LlamaForCausalLM") == "sdpa"
    monkeypatch.setattr(transformers.LlamaForCausalLM, "_supports_sdpa", False)
    with caplog.at_level("WARNING", logger="onecard.train"):
        assert resolve_attn(auto, "cpu", "LlamaForCausalLM") == "eager"
    assert "no SDPA attention" in caplog.text
    with pytest.raises(UserError, match="no SDPA attention") as exc:
        resolve_attn(sdpa, "cpu", "LlamaForCausalLM")
    assert exc.value.where.startswith("model.attn_implementation")


def test_gemma2_loads_with_the_default_attention(tiny_model_factory):
    """The default recipe loads Gemma 2 under whichever transformers is installed (with or without its SDPA
    path)."""
    import transformers

    from onecard.train.model import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(recipe(tiny_model_factory("gemma2")), "cpu")
    expected = "sdpa" if transformers.Gemma2ForCausalLM._supports_sdpa else "eager"
    assert model.config._attn_implementation == expected
