"""``onecard report RUN_DIR``: one self-contained HTML page about a run (inline SVG and CSS, no scripts, no network).

Reads what the run directory holds (docs/architecture.md): ``metrics.jsonl`` (train loss, ``eval_*``, tokens/s,
peak memory, and for DPO/KTO the rewards, per logged step), ``summary.json`` (measured figures, the memory plan
``plan.total_bytes`` + ``plan.components``, on CUDA ``plan_vs_measured``; DPO/KTO held-out ``eval_reward_*``),
``eval.json`` (from ``onecard eval``) and ``recipe.yaml``. Sections whose inputs are missing say so instead of
disappearing. Charts and the memory section: ``report_charts.py``.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from onecard import __version__
from onecard.errors import UserError
from onecard.eval.harness import FRACTION_METRICS, HIGHER_IS_BETTER, METRIC_LABELS
from onecard.eval.report_charts import GIB, data_section, memory_section, training_charts

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:60rem;color:#111;padding:0 1rem;line-height:1.4}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.subtitle{color:#444;margin:.2rem 0 1rem}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(13rem,1fr));gap:.6rem;margin:1rem 0}
.fact{border:1px solid #e5e7eb;border-radius:6px;padding:.5rem .7rem}.fact .k{font-size:.75rem;color:#555;text-transform:uppercase;letter-spacing:.03em}
.fact .v{font-size:1.05rem;font-weight:600;overflow-wrap:anywhere}.fact .d{font-size:.8rem;color:#555}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:right}
td:first-child,th:first-child{text-align:left}tr.total td{font-weight:600}.better{color:#15803d}.worse{color:#b91c1c}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(26rem,1fr));gap:0 1.2rem}
svg.chart{display:block;max-width:100%;height:auto;margin:.8rem 0}
svg .title{font-size:13px;font-weight:600}svg .tick,svg .legend,svg .axis{font-size:11px;fill:#444}
svg .plot-area{fill:none;stroke:#d4d4d4}svg .grid{stroke:#eee}
svg .bar.planned{fill:#93c5fd}svg .bar.measured{fill:#2563eb}svg .bar.component{fill:#cbd5e1}
.sample{border:1px solid #ddd;border-radius:6px;padding:.5rem .8rem;margin:.6rem 0}.sample pre{white-space:pre-wrap;margin:.2rem 0}
.label{font-size:.8rem;color:#555;text-transform:uppercase}.empty{color:#777;font-style:italic}.note{color:#92400e}
small{color:#555}pre.recipe{background:#f8fafc;border:1px solid #e5e7eb;padding:.6rem;overflow-x:auto}
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


def _read_recipe(path: Path) -> tuple[str, dict[str, Any]]:
    """(text, parsed tree); the tree is read as plain YAML so a recipe from an older onecard still renders."""
    if not path.is_file():
        return "", {}
    import yaml

    text = path.read_text(encoding="utf-8")
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        tree = None
    return text, tree if isinstance(tree, dict) else {}


METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA", "full": "full fine-tune"}
TASK_NAMES = {"sft": "SFT", "pretrain": "continued pre-training", "dpo": "DPO", "kto": "KTO"}


def subtitle(summary: dict, recipe: dict) -> str:
    """One line: what was trained, on what, how."""
    method = summary.get("method") or recipe.get("method")
    task = summary.get("task") or recipe.get("task") or "sft"
    rank = (recipe.get("adapter") or {}).get("rank")
    how = METHOD_NAMES.get(method, str(method or "?")) + (f" r{rank}" if rank and method != "full" else "")
    model = Path(str((recipe.get("model") or {}).get("name_or_path", "?"))).name
    return f"{TASK_NAMES.get(task, task)} · {how} · base model {model}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def fact_cards(summary: dict) -> str:
    """The headline numbers, each with a human label and its unit."""
    facts: list[tuple[str, str, str]] = []
    if summary.get("steps") is not None:
        resumed = summary.get("resumed_from_step")
        facts.append(("optimizer steps", f"{summary['steps']:,}", f"resumed from step {resumed}" if resumed else ""))
    first, final = summary.get("first_loss"), summary.get("final_loss")
    if isinstance(final, (int, float)):
        change = f"{(final - first) / first:+.0%} from {first:.4g}" if isinstance(first, (int, float)) and first else ""
        facts.append(("final train loss", f"{final:.4g}", change))
    for key, label in (("eval_reward_accuracy", "held-out reward accuracy"), ("eval_reward_margin", "held-out reward margin")):
        if isinstance(summary.get(key), (int, float)):
            value = f"{summary[key]:.1%}" if key.endswith("accuracy") else f"{summary[key]:+.3g}"
            facts.append((label, value, f"{summary.get('eval_examples', '?')} held-out examples"))
    if isinstance(summary.get("tokens"), (int, float)):
        trained = summary.get("trained_tokens")
        facts.append(("tokens seen", f"{summary['tokens']:,}", f"{trained:,} in the loss" if trained is not None else ""))
    rate = summary.get("steady_tokens_per_s_measured", summary.get("tokens_per_s_measured"))
    if isinstance(rate, (int, float)):
        facts.append(("throughput (measured)", f"{rate:,.0f} tokens/s", ""))
    if isinstance(summary.get("train_seconds_measured"), (int, float)):
        facts.append(("training time (measured)", _duration(summary["train_seconds_measured"]), ""))
    peak = summary.get("peak_memory_bytes_measured", summary.get("peak_memory_bytes"))
    if isinstance(peak, (int, float)):
        kind = {"cuda_max_memory_reserved": "CUDA reserved", "process_peak_rss": "process RSS"}.get(
            summary.get("peak_memory_kind"), "")
        facts.append(("peak memory (measured)", f"{peak / GIB:.2f} GiB", kind))
    if summary.get("device"):
        facts.append(("device", str(summary["device"]), str(summary.get("dtype", ""))))
    data = summary.get("data") if isinstance(summary.get("data"), dict) else {}
    if data.get("records") is not None:
        facts.append(("training examples", f"{data['records']:,}",
                      f"{data.get('truncated', 0)} truncated, {data.get('dropped', 0)} dropped"))
    cards = "".join(f'<div class="fact"><div class="k">{escape(k)}</div><div class="v">{escape(v)}</div>'
                    f'<div class="d">{escape(d)}</div></div>' for k, v, d in facts)
    return f'<div class="facts">{cards}</div>' if cards else ""


def eval_section(result: dict | None, summary: dict) -> str:
    preference = preference_eval_table(summary)
    if not result:
        hint = '<p class="empty">No eval.json: run <code>onecard eval RUN_DIR --data FILE --baseline</code>.</p>'
        return preference + ("" if preference else hint)
    has_base = "baseline" in result
    head = "<tr><th>metric</th>" + ("<th>base</th><th>tuned</th><th>change</th>" if has_base else "<th>value</th>") + "</tr>"
    rows = []
    for key, label in METRIC_LABELS.items():
        if key not in result.get("tuned", {}):
            continue
        pct = key in FRACTION_METRICS
        fmt = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.4g}")
        cells = [f"<td>{escape(label)}</td>"]
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
    return preference + f'<table class="eval">{head}{"".join(rows)}</table>{caption}'


PREFERENCE_ROWS = (("reward_accuracy", "reward accuracy"), ("reward_margin", "reward margin"),
                   ("reward_chosen", "reward of chosen"), ("reward_rejected", "reward of rejected"),
                   ("reward_desirable", "reward of desirable"), ("reward_undesirable", "reward of undesirable"))


def preference_eval_table(summary: dict) -> str:
    """DPO/KTO: the held-out rewards (``eval_*``) beside the last training batch's (``final_*``)."""
    rows = []
    for key, label in PREFERENCE_ROWS:
        train, held = summary.get(f"final_{key}"), summary.get(f"eval_{key}")
        if train is None and held is None:
            continue
        fmt = (lambda v: f"{v:.1%}") if key == "reward_accuracy" else (lambda v: f"{v:+.4g}")
        rows.append(f"<tr><td>{label}</td><td>{'-' if train is None else fmt(train)}</td>"
                    f"<td>{'-' if held is None else fmt(held)}</td></tr>")
    if not rows:
        return ""
    beta = f"β = {summary['beta']}" if summary.get("beta") is not None else ""
    return (f'<table class="preference"><tr><th>preference metric</th><th>last train batch</th><th>held-out '
            f'({summary.get("eval_examples", "-")} examples)</th></tr>{"".join(rows)}</table>'
            f"<small>rewards are β · log(π / π_ref) of the completion; {escape(beta)}</small>")


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
    summary = _read_json(run_dir / "summary.json") or {}
    result = _read_json(run_dir / "eval.json")
    recipe_text, recipe = _read_recipe(run_dir / "recipe.yaml")
    name = str(recipe.get("name") or run_dir.name)
    charts = training_charts(records) if records else '<p class="empty">No metrics.jsonl yet.</p>'
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>onecard report: {escape(name)}</title><style>{CSS}</style></head><body>"
            f"<h1>{escape(name)}</h1><p class=\"subtitle\">{escape(subtitle(summary, recipe))}</p>"
            f"{fact_cards(summary)}<p><small>run directory: {escape(str(run_dir.resolve()))}</small></p>"
            f"<h2>Training curves</h2>{charts}"
            f"<h2>Data</h2>{data_section(summary)}"
            f"<h2>Memory</h2>{memory_section(summary)}"
            f"<h2>Evaluation</h2>{eval_section(result, summary)}"
            f"<h2>Sample generations: before / after</h2>{samples_section(result)}"
            f"<h2>Recipe</h2><pre class=\"recipe\">{escape(recipe_text) or '(no recipe.yaml)'}</pre>"
            f"<p><small>written by onecard {__version__} (onecard report)</small></p></body></html>\n")


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
