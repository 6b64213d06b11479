"""``onecard report RUN_DIR``: one self-contained HTML page about a run (inline SVG and CSS, no scripts, no network).

Reads what the run directory holds (docs/architecture.md): ``metrics.jsonl`` (train loss, ``eval_loss``,
tokens/s, peak memory per logged step), ``summary.json`` (measured peak; the memory plan when the trainer
stored one: ``plan.total_bytes`` [+ ``plan.components``] or ``planned_peak_bytes``), ``eval.json`` (from
``onecard eval``) and ``recipe.yaml``. Sections whose inputs are missing say so instead of disappearing.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from onecard.errors import UserError
from onecard.eval.svg import bar_chart, line_chart

GIB = 1024**3
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:60rem;color:#111;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:right}
td:first-child,th:first-child{text-align:left}.better{color:#15803d}.worse{color:#b91c1c}
svg .title{font-size:13px;font-weight:600}svg .tick,svg .legend,svg .axis{font-size:11px;fill:#444}
svg .grid{stroke:#eee}svg .bar.planned{fill:#93c5fd}svg .bar.measured{fill:#2563eb}svg .bar.component{fill:#cbd5e1}
.sample{border:1px solid #ddd;border-radius:6px;padding:.5rem .8rem;margin:.6rem 0}.sample pre{white-space:pre-wrap;margin:.2rem 0}
.label{font-size:.8rem;color:#555;text-transform:uppercase}.empty{color:#777;font-style:italic}small{color:#555}
"""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run: the rest still plots
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _points(records, key: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))]


def training_charts(records: list[dict]) -> str:
    loss = line_chart("loss", "Loss", {"train loss": _points(records, "loss"), "eval loss": _points(records, "eval_loss")},
                      "optimizer step", "loss")
    speed = line_chart("tokens_per_s", "Throughput (measured)", {"tokens/s": _points(records, "tokens_per_s")},
                       "optimizer step", "tokens / s")
    memory = [(x, y / GIB) for x, y in _points(records, "peak_memory_bytes")]
    mem = line_chart("memory", "Peak memory so far (measured)", {"peak memory": memory}, "optimizer step", "GiB")
    return loss + speed + mem


def plan_numbers(summary: dict | None) -> tuple[float | None, dict[str, float]]:
    """(planned total bytes, components) from summary.json, in any of the shapes the trainer may store."""
    if not summary:
        return None, {}
    plan = summary.get("plan") if isinstance(summary.get("plan"), dict) else {}
    total = plan.get("total_bytes", summary.get("planned_peak_bytes", summary.get("plan_total_bytes")))
    components = plan.get("components") if isinstance(plan.get("components"), dict) else {}
    return total, {k: v for k, v in components.items() if isinstance(v, (int, float))}


def memory_section(summary: dict | None) -> str:
    measured = None
    if summary:
        measured = summary.get("peak_memory_bytes_measured", summary.get("peak_memory_bytes"))
    total, components = plan_numbers(summary)
    if measured is None and total is None:
        return '<p class="empty">No summary.json with memory numbers (the run has not finished).</p>'
    bars = [(f"plan: {name}", v / GIB, "component") for name, v in components.items()]
    if total is not None:
        bars.append(("planned peak (estimated)", total / GIB, "planned"))
    if measured is not None:
        bars.append(("measured peak", measured / GIB, "measured"))
    note = ""
    if total is not None and measured is not None:
        note = f"<p>measured / planned = {measured / total:.2f}</p>"
    elif total is None:
        note = '<p class="empty">No memory plan stored in summary.json: measured peak only.</p>'
    kind = escape(str((summary or {}).get("peak_memory_kind", "")))
    return bar_chart("memory_plan", "Memory: plan vs measured peak", bars, "GiB") + note + (f"<small>measured as {kind}</small>" if kind else "")


def eval_section(result: dict | None) -> str:
    if not result:
        return '<p class="empty">No eval.json: run <code>onecard eval RUN_DIR --data FILE --baseline</code>.</p>'
    from onecard.eval.harness import HIGHER_IS_BETTER

    has_base = "baseline" in result
    head = "<tr><th>metric</th>" + ("<th>base</th><th>tuned</th><th>Δ</th>" if has_base else "<th>value</th>") + "</tr>"
    rows = []
    for key in ("loss", "perplexity", "exact_match", "token_f1", "rouge_l"):
        if key not in result.get("tuned", {}):
            continue
        pct = key not in ("loss", "perplexity")
        fmt = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.4g}")
        cells = [f"<td>{escape(key)}</td>"]
        if has_base:
            delta = result["delta"].get(key, 0.0)
            cls = "better" if (delta > 0) == HIGHER_IS_BETTER[key] and delta else "worse" if delta else ""
            dtext = f"{delta * 100:+.1f} pt" if pct else f"{delta:+.4g}"
            cells += [f"<td>{fmt(result['baseline'][key])}</td>", f"<td>{fmt(result['tuned'][key])}</td>",
                      f'<td class="{cls}">{dtext}</td>']
        else:
            cells.append(f"<td>{fmt(result['tuned'][key])}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    d = result.get("decoding", {})
    caption = (f"<small>data: {escape(str(result.get('data')))}; {result.get('examples', {}).get('loss', '?')} examples; "
               f"decoding: {escape(str(d.get('strategy', '?')))}, {d.get('max_new_tokens', '?')} new tokens, seed {d.get('seed', '?')}</small>")
    return f'<table class="eval">{head}{"".join(rows)}</table>{caption}'


def samples_section(result: dict | None) -> str:
    samples = (result or {}).get("samples") or []
    if not samples:
        return '<p class="empty">No sample generations (eval.json missing or the data has no reference answers).</p>'
    out = []
    for s in samples:
        parts = [f'<div class="sample"><div class="label">prompt</div><pre>{escape(str(s.get("prompt")))}</pre>']
        for key, label in (("reference", "reference"), ("baseline", "before (base)"), ("tuned", "after (tuned)")):
            if s.get(key) is not None:
                parts.append(f'<div class="label">{label}</div><pre class="{key}">{escape(str(s[key]))}</pre>')
        out.append("".join(parts) + "</div>")
    return "".join(out)


def render_report(run_dir: Path) -> str:
    records = read_jsonl(run_dir / "metrics.jsonl")
    summary = _read_json(run_dir / "summary.json")
    result = _read_json(run_dir / "eval.json")
    recipe_text = (run_dir / "recipe.yaml").read_text(encoding="utf-8") if (run_dir / "recipe.yaml").is_file() else ""
    facts = ""
    if summary:
        keys = ("method", "task", "device", "dtype", "steps", "first_loss", "final_loss", "tokens", "tokens_per_s_measured",
                "train_seconds_measured")
        facts = "<table>" + "".join(f"<tr><td>{escape(k)}</td><td>{escape(_short(summary[k]))}</td></tr>"
                                    for k in keys if k in summary) + "</table>"
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>onecard report: {escape(run_dir.name)}</title>"
            f"<style>{CSS}</style></head><body><h1>onecard report: {escape(run_dir.name)}</h1>"
            f"<p><small>{escape(str(run_dir.resolve()))}</small></p>{facts}"
            f"<h2>Training curves</h2>{training_charts(records) if records else '<p class=empty>No metrics.jsonl yet.</p>'}"
            f"<h2>Memory</h2>{memory_section(summary)}"
            f"<h2>Evaluation</h2>{eval_section(result)}"
            f"<h2>Sample generations: before / after</h2>{samples_section(result)}"
            f"<h2>Recipe</h2><pre>{escape(recipe_text) or '(no recipe.yaml)'}</pre></body></html>\n")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError("run directory not found", where=str(run_dir), fix="pass the directory onecard train wrote (runs/<name>)")
    if not any((run_dir / f).exists() for f in ("metrics.jsonl", "summary.json", "eval.json", "recipe.yaml")):
        raise UserError("nothing to report: no metrics.jsonl, summary.json, eval.json or recipe.yaml", where=str(run_dir),
                        fix="run onecard train (and onecard eval) first")
    target = Path(out) if out else run_dir / "report.html"
    target.write_text(render_report(run_dir), encoding="utf-8")
    return target
