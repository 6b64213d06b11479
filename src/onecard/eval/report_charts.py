"""The report's charts: training curves from ``metrics.jsonl`` and the memory section from ``summary.json``.

Which curves exist depends on the task: every run has loss, learning rate, gradient norm, throughput and memory;
DPO adds chosen/rejected rewards, their margin and the pair accuracy; KTO adds desirable/undesirable rewards and
its KL estimate; runs with ``eval.every_steps`` add held-out loss and the generation metrics over steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Any

from onecard.eval.svg import bar_chart, line_chart

GIB = 1024**3


@dataclass(frozen=True)
class Curve:
    name: str  # data-chart id
    title: str
    series: tuple[tuple[str, str], ...]  # (metrics.jsonl key, legend label)
    y_label: str
    scale: float = 1.0  # multiplies every value (bytes -> GiB, fraction -> %)
    always: bool = False  # drawn (or said to be empty) on every run; the others only when their keys were logged
    y_span: tuple[float, float] | None = None  # a range the y axis always covers


CURVES = (
    Curve("loss", "Loss", (("loss", "train loss"), ("eval_loss", "held-out loss")), "loss", always=True),
    Curve("rewards", "Implicit rewards: chosen vs rejected",
          (("reward_chosen", "chosen"), ("reward_rejected", "rejected")), "β · log(π / π_ref)"),
    Curve("kto_rewards", "Implicit rewards: desirable vs undesirable",
          (("reward_desirable", "desirable"), ("reward_undesirable", "undesirable")), "β · log(π / π_ref)"),
    Curve("reward_margin", "Reward margin", (("reward_margin", "margin (train batch)"),), "reward difference"),
    Curve("reward_accuracy", "Reward accuracy", (("reward_accuracy", "accuracy (train batch)"),), "%", scale=100, y_span=(0, 100)),
    Curve("kl", "KL estimate (KTO reference point)", (("kl", "KL"),), "KL"),
    Curve("eval_generation", "Held-out generation metrics",
          (("eval_exact_match", "exact match"), ("eval_token_f1", "token F1"), ("eval_rouge_l", "ROUGE-L")), "%",
          scale=100, y_span=(0, 100)),
    Curve("lr", "Learning rate", (("lr", "learning rate"),), "learning rate"),
    Curve("grad_norm", "Gradient norm (before clipping)", (("grad_norm", "gradient norm"),), "L2 norm"),
    Curve("tokens_per_s", "Throughput (measured)", (("tokens_per_s", "tokens/s"),), "tokens / s", always=True),
    Curve("memory", "Peak memory so far (measured)", (("peak_memory_bytes", "peak memory"),), "GiB", scale=1 / GIB,
          always=True),
)


def points(records: list[dict[str, Any]], key: str, scale: float = 1.0) -> list[tuple[float, float]]:
    return [(float(r["step"]), float(r[key]) * scale) for r in records
            if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))]


def training_charts(records: list[dict[str, Any]]) -> str:
    out = []
    for curve in CURVES:
        series = {label: points(records, key, curve.scale) for key, label in curve.series}
        if curve.always or any(series.values()):
            out.append(line_chart(curve.name, curve.title, series, "optimizer step", curve.y_label, curve.y_span))
    return '<div class="charts">' + "".join(out) + "</div>"


MEASURE_KINDS = {
    "cuda_max_memory_reserved": "CUDA memory reserved by torch's caching allocator (torch.cuda.max_memory_reserved)",
    "process_peak_rss": "peak resident memory of the whole process (RSS): Python, torch, the model and the data",
}


def plan_numbers(summary: dict | None) -> tuple[float | None, dict[str, float]]:
    """(planned total bytes, components) from summary.json, in any of the shapes the trainer may store."""
    if not summary:
        return None, {}
    plan = summary.get("plan") if isinstance(summary.get("plan"), dict) else {}
    total = plan.get("total_bytes", summary.get("planned_peak_bytes", summary.get("plan_total_bytes")))
    components = plan.get("components") if isinstance(plan.get("components"), dict) else {}
    return total, {k: v for k, v in components.items() if isinstance(v, (int, float))}


def memory_section(summary: dict | None) -> str:
    """What was measured, what the plan said, and a comparison only when both describe the same memory."""
    summary = summary or {}
    measured = summary.get("peak_memory_bytes_measured", summary.get("peak_memory_bytes"))
    total, components = plan_numbers(summary)
    if measured is None and total is None:
        return '<p class="empty">No summary.json with memory numbers (the run has not finished).</p>'
    parts = []
    if measured is not None:
        kind = summary.get("peak_memory_kind")
        how = MEASURE_KINDS.get(kind, f"measured as {kind}" if kind else "how it was measured is not recorded")
        parts.append(f'<p>Measured peak: <b>{measured / GIB:.2f} GiB</b> on {escape(str(summary.get("device", "?")))}'
                     f' <small>({escape(how)})</small></p>')
    parts.append(_comparison(summary, measured))
    parts.append(_plan_breakdown(summary, total, components))
    return "".join(parts)


def _comparison(summary: dict, measured: float | None) -> str:
    """Planned vs measured on CUDA, at the shapes the run really had (summary's ``plan_vs_measured``)."""
    pvm = summary.get("plan_vs_measured") if isinstance(summary.get("plan_vs_measured"), dict) else {}
    planned_gib, measured_gib = pvm.get("predicted_peak_reserved_gib"), pvm.get("measured_peak_reserved_gib")
    if summary.get("peak_memory_kind") == "cuda_max_memory_reserved" and planned_gib and measured_gib:
        bars = [("planned peak reserved (estimated)", planned_gib, "planned"),
                ("measured peak reserved", measured_gib, "measured")]
        seq = (pvm.get("planned_seq_len") or {}).get("memory")
        error = (measured_gib - planned_gib) / planned_gib
        return (bar_chart("memory_plan", f"Memory on {pvm.get('gpu', 'the GPU')}: plan vs measured", bars, "GiB")
                + f'<p>The measured peak is <b>{error:+.0%}</b> against the plan for this run\'s shapes'
                + (f" (longest example: {seq} tokens)" if seq else "") + ".</p>")
    if measured is None:
        return ""
    if summary.get("peak_memory_kind") == "cuda_max_memory_reserved":
        return '<p class="empty">No plan for this run\'s shapes in summary.json: nothing to compare with.</p>'
    gpu = ((summary.get("plan") or {}).get("gpu")) or "a GPU"
    return (f'<p class="note">Not compared with the plan: the plan is GPU memory on {escape(str(gpu))}, while this run '
            f'measured a {escape(str(summary.get("device", "non-CUDA")))} process. Run on a CUDA GPU to check the plan.</p>')


def _plan_breakdown(summary: dict, total: float | None, components: dict[str, float]) -> str:
    plan = summary.get("plan") if isinstance(summary.get("plan"), dict) else {}
    if total is None:
        error = plan.get("error")
        return (f'<p class="empty">No memory plan stored in summary.json{": planner error " + escape(error) if error else ""}'
                f'.</p>')
    gpu = plan.get("gpu")
    title = f"Memory plan{' for ' + str(gpu) if gpu else ''} by component (estimated)"
    ranked = sorted(components.items(), key=lambda kv: -kv[1])
    unit, div = ("GiB", GIB) if total >= GIB else ("MiB", 2**20)
    bars = [(name, value / div, "component") for name, value in ranked] + [("total at the peak", total / div, "planned")]
    shares = [f"({value / total:.0%})" for _, value in ranked] + [""]
    return bar_chart("plan_components", title, bars, unit, shares)


def data_section(summary: dict | None) -> str:
    """The training data as prepared (``summary.json``'s ``data_summary``, data/stats.py): the length histogram
    and the counts ``onecard data RECIPE --stats`` prints."""
    data = (summary or {}).get("data_summary")
    if not data:
        return '<p class="empty">No data statistics in summary.json (a preference run, or an older run).</p>'
    edges, counts, seq_len = data["histogram"]["edges"], data["histogram"]["counts"], data["seq_len"]
    bars = [(f"{lo:,}-{hi:,}", float(n), "component") for lo, hi, n in zip(edges, edges[1:], counts)]
    notes = ["<- seq_len" if lo < seq_len <= hi else "" for lo, hi in zip(edges, edges[1:])]
    chart = bar_chart("length_histogram", "Example length in tokens, before truncation", bars, "examples", notes)
    packing = data["packing"]
    facts = [("records / examples kept", f"{data['records']:,} / {data['examples']:,}"),
             ("truncated (> seq_len {:,})".format(seq_len), f"{data['truncated']:,}"),
             ("dropped (nothing to train)", f"{data['dropped']:,}"),
             ("trained tokens", f"{data['trained_tokens']:,} of {data['tokens']:,} ({data['trained_fraction']:.1%})"),
             ("packing efficiency", f"{packing['efficiency']:.1%} ({packing['rows']:,} rows)" if packing["enabled"]
              else f"{packing['efficiency']:.1%} if packed (data.packing is off)")]
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in facts)
    return f'{chart}<table class="data-facts">{rows}</table>'
