"""The end of a run: weights saved, then ``summary.json`` (measured figures beside the plan), then the eval.

Measured figures are labelled ``*_measured``. On CUDA the run is compared with the planner's prediction made for
the shapes this run really had: memory at its longest example (rows are padded to the longest in a micro-batch),
speed at its mean example length, and tokens/s over the steps after the first (the first pays for Triton
compilation and allocator warm-up, which a 20-step run would otherwise fold into the rate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onecard.recipe import Recipe


def finish(run_dir: Path, recipe: Recipe, model, tokenizer, state, timing, dataset, device: str, started: int,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save the adapter or model, then ``summary.json`` last: its presence marks a finished run."""
    from onecard.train.metrics import peak_memory_bytes
    from onecard.train.rundir import save_result, write_json_atomic

    output = save_result(run_dir, model, tokenizer, recipe.is_adapter)
    losses = [r["loss"] for r in state.metrics if "loss" in r]
    peak, peak_kind = peak_memory_bytes(device)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir), "output": str(output), "method": recipe.method, "task": recipe.task,
        "device": device, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "steps": state.global_step, "resumed_from_step": started or None,
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "tokens": state.tokens_seen, "trained_tokens": state.trained_tokens,
        "train_seconds_measured": timing["seconds"],
        "tokens_per_s_measured": timing["tokens"] / max(timing["seconds"], 1e-9),
        "peak_memory_bytes_measured": peak, "peak_memory_kind": peak_kind,
        "data": dataset.stats.as_dict(),
        "plan": planned_memory(recipe),
    }
    if timing.get("steady_seconds"):
        summary["steady_tokens_per_s_measured"] = timing["steady_tokens"] / timing["steady_seconds"]
    summary.update(extra or {})
    if device.startswith("cuda"):
        summary.update(cuda_measurements(recipe, dataset, summary))
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def cuda_measurements(recipe: Recipe, dataset, summary: dict[str, Any]) -> dict[str, Any]:
    """Peak reserved/allocated since the training loop began (setup peak kept apart) and the plan beside them."""
    import torch

    from onecard.plan.compare import plan_vs_measured

    from onecard.data.store import row_lengths

    lengths = row_lengths(dataset.examples) or [recipe.data.seq_len]
    out = {"cuda_peak_reserved_bytes_measured": int(torch.cuda.max_memory_reserved()),
           "cuda_peak_allocated_bytes_measured": int(torch.cuda.max_memory_allocated())}
    out["plan_vs_measured"] = plan_vs_measured(recipe, {
        "peak_reserved_bytes": out["cuda_peak_reserved_bytes_measured"],
        "peak_allocated_bytes": out["cuda_peak_allocated_bytes_measured"],
        "tokens_per_s": summary.get("steady_tokens_per_s_measured", summary["tokens_per_s_measured"]),
        "device_name": torch.cuda.get_device_name()},
        seq_len_memory=max(lengths), seq_len_speed=round(sum(lengths) / len(lengths)),
        resident_layers=summary.get("streamed_weights_resident_layers"))
    return out


def reset_peak_after_setup(device: str) -> dict[str, Any]:
    """Peak memory of loading and setup (QLoRA's load-time upcast lives here), then a fresh peak for training."""
    if not device.startswith("cuda"):
        return {}
    import torch

    setup = int(torch.cuda.max_memory_reserved())
    torch.cuda.reset_peak_memory_stats()
    return {"setup_peak_reserved_bytes_measured": setup}


def planned_memory(recipe: Recipe) -> dict[str, Any] | None:
    """The memory plan for the recipe's target card, kept beside the measurements (``onecard report`` draws both)."""
    try:
        from onecard.plan.inputs import inputs_from_recipe
        from onecard.plan.memory import plan_memory

        plan = plan_memory(inputs_from_recipe(recipe))
    except Exception as exc:  # noqa: BLE001 -- planning is advice; a planner bug must not fail a finished run
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"gpu": recipe.plan.gpu, "label": "estimated", "total_bytes": int(plan.required_bytes),
            "components": {c.label: int(c.bytes) for c in plan.components if c.at_peak}}


def eval_if_due(model, tokenizer, recipe: Recipe, step: int, logger) -> None:
    """Held-out loss (and generation metrics where references exist) every ``eval.every_steps``, into metrics.jsonl;
    the loss in batches of the training micro-batch: never more rows at once than the run already fit beside its
    model (a CUDA graph's pool stays reserved through the eval)."""
    every = recipe.eval.every_steps
    if not every or step % every or not recipe.has_eval_data:
        return
    from onecard.eval import evaluate

    tuned = evaluate(model, tokenizer, recipe, recipe.eval.path,
                     loss_batch_size=recipe.training.micro_batch_size)["tuned"]
    logger.log({"step": step, **{f"eval_{k}": v for k, v in tuned.items() if isinstance(v, (int, float))}})


def evaluate_and_save(model, tokenizer, recipe: Recipe, summary: dict) -> dict:
    """The end-of-run eval (``eval.at_end``): before/after for adapters, saved as ``eval.json``; returns the metrics."""
    from onecard.eval import evaluate
    from onecard.train.rundir import write_json_atomic

    result = evaluate(model, tokenizer, recipe, recipe.eval.path, baseline=recipe.is_adapter,
                      loss_batch_size=recipe.training.micro_batch_size)  # as eval_if_due
    write_json_atomic(recipe.run_dir / "eval.json", result)
    summary["eval"] = {k: result[k] for k in ("tuned", "baseline", "delta") if k in result}
    write_json_atomic(recipe.run_dir / "summary.json", summary)
    return summary["eval"]
