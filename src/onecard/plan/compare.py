"""Plan against reality: the planner's prediction beside what a run measured, with the error in %.

``onecard train`` calls :func:`plan_vs_measured` when it writes ``summary.json`` on a GPU, so every run checks the
planner. The memory prediction is the planner's allocator figure (``max_memory_reserved`` is what it predicts),
made for the card the run is on (matched from the driver's name) rather than the recipe's planning target.
"""

from __future__ import annotations

from typing import Any

from onecard.catalog.gpus import match_device_name
from onecard.plan.inputs import inputs_from_recipe
from onecard.plan.memory import GIB, plan_memory
from onecard.plan.speed import estimate_throughput


def _pct(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or not measured:
        return None
    return round(100.0 * (predicted - measured) / measured, 1)


def plan_vs_measured(recipe, measured: dict[str, Any], gpu: str | None = None, *, seq_len_memory: int | None = None,
                     seq_len_speed: int | None = None, resident_layers: int | None = None) -> dict[str, Any]:
    """``measured`` keys (any subset): ``peak_reserved_bytes``, ``peak_allocated_bytes``, ``tokens_per_s``,
    ``device_name`` (torch.cuda.get_device_name). ``gpu``: catalog id to plan for (default: from device_name, else
    the recipe's ``plan.gpu``). ``seq_len_memory`` / ``seq_len_speed``: the row lengths the run really had (its
    longest and its mean example; default the recipe's ``seq_len``). ``resident_layers``: the run streamed the
    base weights of the other layers (plan/streaming.py), so the plan does too. Returns predicted and measured
    figures with errors; never raises on a planner bug."""
    out: dict[str, Any] = {"label": "planned (estimated/calibrated) vs measured"}
    gpu_id = gpu or _gpu_from_name(measured.get("device_name")) or recipe.plan.gpu
    out["gpu"] = gpu_id
    try:
        inp = inputs_from_recipe(recipe, gpu=gpu_id)
        plan = plan_memory(inp.with_(seq_len=seq_len_memory or inp.seq_len))
        speed_inp = inp.with_(seq_len=seq_len_speed or inp.seq_len)
        speed_plan = plan_memory(speed_inp)
        speed = estimate_throughput(speed_inp, memory_plan=speed_plan)
        out["planned_seq_len"] = {"memory": plan.inputs.seq_len, "speed": speed_inp.seq_len}
        allocator, tokens_per_s, label = plan.allocator_bytes, speed.estimate_tokens_per_s, speed.label
        if resident_layers is not None:
            from onecard.plan.streaming import off_card_bytes, plan_streaming, streamed_tokens_per_s

            allocator -= off_card_bytes(plan, resident_layers)
            sp = plan_streaming(speed_plan, resident=resident_layers)
            tokens_per_s = streamed_tokens_per_s(tokens_per_s, speed_inp, sp)
            label, out["planned_resident_layers"] = f"{label} + streaming (estimated)", resident_layers
        out["predicted_peak_reserved_gib"] = round(allocator / GIB, 3)
        out["predicted_tokens_per_s"] = round(tokens_per_s, 1)
        out["predicted_tokens_per_s_label"] = label
    except Exception as exc:  # noqa: BLE001 -- a planner failure must not fail a finished run
        out["planner_error"] = f"{type(exc).__name__}: {exc}"
    reserved = measured.get("peak_reserved_bytes")
    out["measured_peak_reserved_gib"] = round(reserved / GIB, 3) if reserved else None
    if measured.get("peak_allocated_bytes"):
        out["measured_peak_allocated_gib"] = round(measured["peak_allocated_bytes"] / GIB, 3)
    out["measured_tokens_per_s"] = measured.get("tokens_per_s")
    out["peak_error_pct"] = _pct(out.get("predicted_peak_reserved_gib"), out["measured_peak_reserved_gib"])
    out["tokens_per_s_error_pct"] = _pct(out.get("predicted_tokens_per_s"), out["measured_tokens_per_s"])
    return out


def _gpu_from_name(name: str | None) -> str | None:
    if not name:
        return None
    gpu = match_device_name(name)
    return gpu.id if gpu else None


def format_lines(result: dict[str, Any]) -> list[str]:
    """Two human lines for a run summary: memory and speed, planned beside measured."""
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    return [
        f"peak memory: measured {fmt(result.get('measured_peak_reserved_gib'), '.2f')} GiB reserved, planned "
        f"{fmt(result.get('predicted_peak_reserved_gib'), '.2f')} GiB ({fmt(result.get('peak_error_pct'), '+.1f')}%)",
        f"tokens/s: measured {fmt(result.get('measured_tokens_per_s'), ',.0f')}, planned "
        f"{fmt(result.get('predicted_tokens_per_s'), ',.0f')} ({fmt(result.get('tokens_per_s_error_pct'), '+.1f')}%)",
    ]
