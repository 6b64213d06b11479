"""Acceptance 1: every architecture x method x task trains, changes the model, and reloads with plain libraries.

Each case: 30 optimizer steps on a tiny 2-layer model, then
- the loss falls (mean of the last 5 logged losses well below the first 5),
- the tuned logits differ from the base's by far more than the reload tolerance,
- the saved result reloads -- adapters with plain ``peft.PeftModel.from_pretrained`` on a freshly loaded base
  (QLoRA: the same BitsAndBytesConfig), full fine-tunes with plain ``AutoModelForCausalLM.from_pretrained`` --
  and gives the same logits as the model in memory.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

ARCHS = ["llama", "mistral", "qwen2", "gemma"]
METHODS = ["lora", "qlora", "dora", "full"]
TASKS = ["sft", "pretrain"]
RELOAD_TOL = 1e-4  # fp32 on CPU: a reload reproduces the logits to rounding
PROBE = [5, 17, 42, 99, 123, 7, 64, 201, 33, 250, 11, 80]


def write_chat(path, n=16):
    rows = []
    for i in range(n):
        answer = "yes " * (1 + i % 5) + "the quick brown fox"
        rows.append({"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_text(path, n=16):
    rows = [{"text": "The quick brown fox jumps over the lazy dog. " * (1 + i % 3)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_recipe(tmp_path, model_dir, method, task, **training):
    from onecard.recipe import validate_recipe

    data = write_chat(tmp_path / "chat.jsonl") if task == "sft" else write_text(tmp_path / "text.jsonl")
    t = dict(max_steps=30, micro_batch_size=2, grad_accum=1, learning_rate=1e-3 if method == "full" else 1e-2,
             warmup_ratio=0.0, optimizer="adamw_torch", grad_ckpt=False, seed=3)
    t.update(training)
    return validate_recipe({
        "name": f"{method}-{task}", "model": {"name_or_path": str(model_dir)}, "method": method, "task": task,
        "adapter": {"rank": 8, "dropout": 0.0}, "quant": {"compute_dtype": "float32"},
        "data": {"path": str(data), "seq_len": 64, "packing": task == "pretrain"},
        "training": t, "output_dir": str(tmp_path / "runs" / "{name}"),
    })


def probe_logits(model):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([PROBE])).logits.float()


def reload(recipe, run_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if recipe.method == "full":
        return AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32).eval()
    kwargs = {"dtype": torch.float32}
    if recipe.method == "qlora":
        from onecard.train.model import quant_config

        kwargs.update(quantization_config=quant_config(recipe), device_map={"": "cpu"})
    base = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, **kwargs)
    return PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()


def base_logits(recipe):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if recipe.method == "qlora":
        from onecard.train.model import quant_config

        kwargs.update(quantization_config=quant_config(recipe), device_map={"": "cpu"})
    return probe_logits(AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, **kwargs).eval())


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_trains_changes_and_reloads(tmp_path, tiny_model_factory, arch, method, task):
    from onecard.train.loop import train_model

    recipe = make_recipe(tmp_path, tiny_model_factory(arch), method, task)
    model, _, summary = train_model(recipe)
    losses = [json.loads(line)["loss"] for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and summary["steps"] == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"

    tuned = probe_logits(model)
    base = base_logits(recipe)
    reloaded = probe_logits(reload(recipe, recipe.run_dir))
    reload_diff = (tuned - reloaded).abs().max().item()
    tuning_diff = (tuned - base).abs().max().item()
    assert reload_diff <= RELOAD_TOL, f"reloaded logits differ by {reload_diff}"
    assert tuning_diff > 1000 * RELOAD_TOL, f"tuning moved logits by only {tuning_diff}"

    out = recipe.run_dir / ("model" if method == "full" else "adapter")
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    assert (out / "tokenizer.json").is_file()
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json"):
        assert (recipe.run_dir / name).is_file()
    assert any((recipe.run_dir / "tb").iterdir())


def test_trained_weights_changed(tmp_path, tiny_model_factory):
    """The adapter's weights moved away from their initialisation (lora_B starts at zero, lora_A at random)."""
    import torch
    from safetensors.torch import load_file

    from onecard.train.loop import train_model
    from onecard.train.model import load_model_and_tokenizer

    recipe = make_recipe(tmp_path, tiny_model_factory("llama"), "lora", "sft", max_steps=5)
    fresh, _ = load_model_and_tokenizer(recipe, "cpu")
    initial = {n: p.detach().clone() for n, p in fresh.named_parameters() if p.requires_grad}
    model, _, _ = train_model(recipe)
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert initial.keys() == trained.keys() and initial
    for name, before in initial.items():
        assert not torch.equal(before, trained[name]), f"{name} did not change"
    saved = load_file(str(recipe.run_dir / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in saved.items())
