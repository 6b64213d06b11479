"""What the planner says for a bench configuration: peak memory, tokens/s, FLOPs per token.

A planner piece that raises gives ``None`` with a note, never a crash: a planner bug must not lose a measurement
(and the note says why a column is empty). MFU follows PaLM (Chowdhery et al. 2022, appendix B) as nanoGPT does:
*model* FLOPs per token (no gradient-checkpointing recompute) x tokens/s / peak dense bf16 FLOP/s; HFU counts the
recompute too.
"""

from __future__ import annotations

from typing import Any

from onecard.plan.inputs import flops_for_recipe, inputs_from_recipe
from onecard.plan.memory import plan_memory
from onecard.plan.speed import estimate_throughput

GIB = 2**30


def flops(cfg) -> dict[str, Any]:
    """Model FLOPs per token (no checkpoint recompute) and hardware FLOPs (with it), from the planner."""
    if cfg.model == "tiny":
        return {"model_flops_per_token": None, "hardware_flops_per_token": None, "flops_source": "tiny model: n/a"}
    recipe = cfg.to_recipe()
    with_ckpt = flops_for_recipe(recipe)
    no_ckpt = flops_for_recipe(recipe, grad_ckpt=False)
    return {"model_flops_per_token": no_ckpt.matmul_per_token,
            "hardware_flops_per_token": with_ckpt.matmul_per_token, "flops_source": "onecard.plan.flops"}


def streamed_off_card_bytes(plan, cfg) -> int:
    """What streaming the base weights takes off the card: the streamed layers, less the slots they are copied
    into (plan/streaming.py); 0 without ``cfg.offload_weights``."""
    if not cfg.offload_weights:
        return 0
    from onecard.plan.streaming import off_card_bytes

    return off_card_bytes(plan, cfg.resident_layers)


def peak_memory(cfg) -> dict[str, Any]:
    """The memory planner's predicted peak for this configuration on ``cfg.gpu``, in GiB.

    ``predicted_peak_gib`` is the planner's allocator figure (what ``max_memory_reserved`` reports);
    ``predicted_required_gib`` adds the CUDA context it budgets outside the allocator.
    """
    if cfg.model == "tiny":
        return {"predicted_peak_gib": None, "predicted_note": "tiny model: not planned"}
    try:
        plan = plan_memory(inputs_from_recipe(cfg.to_recipe(), gpu=cfg.gpu))
    except Exception as exc:  # a planner bug must not lose a measurement
        return {"predicted_peak_gib": None, "predicted_note": f"memory planner failed: {type(exc).__name__}: {exc}"}
    if cfg.offload_weights:
        from onecard.plan.streaming import plan_streaming

        sp = plan_streaming(plan, resident=cfg.resident_layers)
        saved = streamed_off_card_bytes(plan, cfg)
        return {"predicted_peak_gib": (plan.allocator_bytes - saved) / GIB,
                "predicted_required_gib": (plan.required_bytes - saved) / GIB, "predicted_peak_phase": plan.peak_phase,
                "predicted_stream_host_gib": sp.host_weight_bytes / GIB}
    return {"predicted_peak_gib": plan.allocator_bytes / GIB, "predicted_required_gib": plan.required_bytes / GIB,
            "predicted_peak_phase": plan.peak_phase}


def speed(cfg) -> dict[str, Any]:
    """The speed planner's tokens/s for this configuration on ``cfg.gpu``."""
    if cfg.model == "tiny":
        return {"predicted_tokens_per_s": None}
    try:
        inputs = inputs_from_recipe(cfg.to_recipe(), gpu=cfg.gpu)
        est = estimate_throughput(inputs)
        tokens_per_s, label = est.estimate_tokens_per_s, est.label
        if cfg.offload_weights:  # copies that do not hide behind compute (plan/streaming.py)
            from onecard.plan.memory import plan_memory
            from onecard.plan.streaming import plan_streaming, streamed_tokens_per_s

            sp = plan_streaming(plan_memory(inputs), resident=cfg.resident_layers)
            tokens_per_s, label = streamed_tokens_per_s(tokens_per_s, inputs, sp), f"{label} + streaming (estimated)"
    except Exception as exc:  # noqa: BLE001 -- a planner bug must not lose a measurement
        return {"predicted_tokens_per_s": None,
                "predicted_speed_note": f"speed planner failed: {type(exc).__name__}: {exc}"}
    return {"predicted_tokens_per_s": tokens_per_s, "predicted_tokens_per_s_label": label}


def predict(cfg) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in (flops, peak_memory, speed):
        try:
            out.update(part(cfg))
        except Exception as exc:  # noqa: BLE001 -- never lose a measurement to a prediction
            out[f"{part.__name__}_error"] = f"{type(exc).__name__}: {exc}"
    return out


def utilisation(tokens_per_s: float | None, flops_info: dict[str, Any], peak_tflops: float | None) -> dict[str, Any]:
    if not tokens_per_s or not peak_tflops or not flops_info.get("model_flops_per_token"):
        return {"mfu": None, "hfu": None}
    peak = peak_tflops * 1e12
    return {"mfu": tokens_per_s * flops_info["model_flops_per_token"] / peak,
            "hfu": tokens_per_s * flops_info["hardware_flops_per_token"] / peak}


def error_pct(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or not measured:
        return None
    return 100.0 * (predicted - measured) / measured
