"""The demo, top to bottom: materialise the model -> evaluate the base -> train (``onecard train``'s
own ``train()``) -> evaluate the saved adapter -> ``demo.json``.

Budget: under 3 minutes on 2 CPU cores with no network. LoRA on SmolLM2-135M runs ~160 tokens/s there in
fp32 (measured), so 20 steps of 4 x <=128 tokens (~80 tokens each) take about a minute; the two evaluations
generate 24 answers each in one batch of at most 56 new tokens. Gradient checkpointing is off: activations of
4 x 128 tokens are small, and recomputation would cost ~30 % more time for memory we do not need.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from onecard.errors import UserError

DEFAULT_OUT = Path("runs/demo")
DEFAULT_STEPS = 20
SEED = 42
MIN_GAIN = 30.0  # style points the tuned model must gain over the base for the demo to count as a success


def demo_recipe(gguf_path: Path, out: Path, steps: int):
    """The recipe ``onecard train`` would read; it is saved in the run directory as recipe.yaml."""
    from onecard.demo.dataset import HELDOUT_FILE, TRAIN_FILE
    from onecard.recipe import Recipe

    return Recipe.model_validate({
        "name": "demo",
        "model": {"name_or_path": str(gguf_path), "dtype": "auto"},
        "method": "lora",
        "task": "sft",
        "adapter": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "auto"},
        "data": {"path": str(TRAIN_FILE), "eval_path": str(HELDOUT_FILE), "format": "chat", "seq_len": 128},
        "training": {"max_steps": steps, "micro_batch_size": 4, "grad_accum": 1, "learning_rate": 2e-3,
                     "lr_scheduler": "cosine", "warmup_steps": 0, "optimizer": "adamw_torch", "grad_ckpt": False,
                     "kernels": "none", "seed": SEED, "save_every_steps": 0, "log_every_steps": 1},
        "output_dir": str(out),
    })


def check_out_dir(out: Path) -> bool:
    """True if ``out`` may be (re)used: absent, empty, or a previous demo run (overwritten). Else a UserError."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    if out.is_dir() and ((out / "demo.json").is_file() or _is_demo_recipe(out / "recipe.yaml")):
        return True
    raise UserError("the output directory exists and is not a previous demo run", where=str(out),
                    fix="pass --out with a new or empty directory")


def _is_demo_recipe(path: Path) -> bool:
    import yaml

    try:
        return path.is_file() and (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("name") == "demo"
    except yaml.YAMLError:
        return False


def run_demo(out: Path = DEFAULT_OUT, steps: int = DEFAULT_STEPS, console=None) -> dict[str, Any]:
    """Run the whole demo; returns (and writes to ``out/demo.json``) the before/after numbers."""
    from onecard.train.gguf_import import find_smollm2_gguf, materialize_gguf

    out = Path(out)
    overwrite = check_out_dir(out)
    say = console.print if console is not None else (lambda *a, **k: None)
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    started, cpu_started = time.perf_counter(), time.process_time()

    gguf_path = find_smollm2_gguf()
    say(f"[bold]1/4[/bold] model: {gguf_path.name} (dequantised once, then cached)")
    model_dir = materialize_gguf(gguf_path)
    recipe = demo_recipe(gguf_path, out, steps)
    seconds["materialize"], cpu["materialize"] = _lap(started), _cpu_lap(cpu_started)

    say("[bold]2/4[/bold] evaluating the base model on the held-out questions")
    mark, cpu_mark = time.perf_counter(), time.process_time()
    base_model, tokenizer, prompts = _load_base(recipe)
    base, base_answers = _evaluate(base_model, tokenizer, recipe, prompts)
    seconds["base_eval"], cpu["base_eval"] = _lap(mark), _cpu_lap(cpu_mark)

    say(f"[bold]3/4[/bold] fine-tuning with LoRA for {steps} steps (the code path of onecard train)")
    mark, cpu_mark = time.perf_counter(), time.process_time()
    from onecard.train.loop import train

    summary = train(recipe, console=console, overwrite=overwrite)
    seconds["train"], cpu["train"] = _lap(mark), _cpu_lap(cpu_mark)

    say("[bold]4/4[/bold] evaluating the tuned model (adapter reloaded from the run directory)")
    mark, cpu_mark = time.perf_counter(), time.process_time()
    tuned_model = _load_adapter(base_model, Path(summary["output"]))
    tuned, tuned_answers = _evaluate(tuned_model, tokenizer, recipe, prompts)
    seconds["tuned_eval"], cpu["tuned_eval"] = _lap(mark), _cpu_lap(cpu_mark)
    seconds["total"], cpu["total"] = _lap(started), _cpu_lap(cpu_started)

    result = _result(recipe, gguf_path, model_dir, summary, base, tuned, prompts, base_answers, tuned_answers,
                     seconds, cpu)
    from onecard.train.rundir import write_json_atomic

    write_json_atomic(out / "demo.json", result)
    return result


def _lap(since: float) -> float:
    return round(time.perf_counter() - since, 2)


def _cpu_lap(since: float) -> float:
    """CPU seconds of this process (all threads): on a shared machine, wall time says more about the neighbours."""
    return round(time.process_time() - since, 2)


def _load_base(recipe):
    from onecard.demo.evaluate import heldout_prompts
    from onecard.train.model import load_base

    model, tokenizer, _ = load_base(recipe)
    return model, tokenizer, heldout_prompts(recipe)


def _evaluate(model, tokenizer, recipe, prompts):
    from onecard.demo.evaluate import evaluate_style
    from onecard.train.spine import seed_everything

    seed_everything(SEED)
    return evaluate_style(model, tokenizer, recipe, prompts, seed=SEED)


def _load_adapter(base_model, adapter_dir: Path):
    """The saved adapter on the (unchanged) base weights, as a user would load it with plain peft."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    model.eval()
    return model


def _result(recipe, gguf_path, model_dir, summary, base, tuned, prompts, base_answers, tuned_answers, seconds, cpu):
    from onecard.demo import style

    change = {k: tuned[k] - base[k] for k in ("heldout_loss", "style_score") + tuple(f"rule_{r}" for r in style.RULES)}
    passed = change["style_score"] >= MIN_GAIN and change["heldout_loss"] < 0
    return {
        "model": {"gguf": str(gguf_path), "materialized": str(model_dir), "name": "SmolLM2-135M-Instruct (Q4_1)"},
        "run_dir": str(recipe.run_dir), "adapter": summary["output"],
        "data": {"train": recipe.data.path, "heldout": recipe.data.eval_path, "heldout_prompts": len(prompts)},
        "metric": {"name": "house-style score", "range": [0, 100], "rules": list(style.RULES),
                   "greeting": style.GREETING, "sign_off": style.SIGN_OFF, "doc": "onecard.demo.style"},
        "decoding": {"strategy": "greedy", "max_new_tokens": _max_new_tokens(), "seed": SEED},
        "base": base, "tuned": tuned, "change": change,
        "passed": passed, "min_gain": MIN_GAIN,
        "training": {k: summary.get(k) for k in ("steps", "first_loss", "final_loss", "tokens", "trained_tokens",
                                                  "tokens_per_s_measured", "train_seconds_measured",
                                                  "peak_memory_bytes_measured")},
        "seconds_measured": seconds, "cpu_seconds_measured": cpu, "load_average": _load_average(),
        "samples": [{"prompt": p[-1]["content"], "base": b, "tuned": t}
                    for p, b, t in zip(prompts, base_answers, tuned_answers)],
    }


def _load_average() -> list[float] | None:
    """1/5/15-minute load average at the end (Unix): whether the timings above ran on a busy machine."""
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _max_new_tokens() -> int:
    from onecard.demo.evaluate import MAX_NEW_TOKENS

    return MAX_NEW_TOKENS
