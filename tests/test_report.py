"""onecard report: one self-contained HTML page, checked on real tiny runs; its layout is measured in headless Chromium.

The SFT and DPO runs are trained through ``onecard train`` on a tiny random model (12 steps each, a few seconds),
so the page is judged on what a user's run directory really holds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from onecard_run_fixtures import cli_exit_code as _cli, write_metrics

os.environ.setdefault("OMP_NUM_THREADS", "1")

EVAL = {"data": "eval.jsonl", "examples": {"loss": 4, "generation": 2},
        "decoding": {"strategy": "greedy", "max_new_tokens": 16, "seed": 0},
        "tuned": {"loss": 0.5, "perplexity": 1.65, "exact_match": 0.5, "token_f1": 0.6, "rouge_l": 0.6},
        "baseline": {"loss": 2.0, "perplexity": 7.39, "exact_match": 0.0, "token_f1": 0.1, "rouge_l": 0.1},
        "delta": {"loss": -1.5, "perplexity": -5.74, "exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.5},
        "samples": [{"prompt": "2+2 <script>alert(1)</script>", "reference": "4", "baseline": "five", "tuned": "4"}]}
STEPS = 12  # ends between round ticks (10, 15): the case where the old axes stopped short of the data



@pytest.fixture(scope="module")
def runs(tiny_model_factory, tmp_path_factory):
    """{"sft": run_dir, "dpo": run_dir}, trained by ``onecard train``; the SFT run also has ``onecard eval``'s eval.json."""
    import yaml
    from test_preference_data import dpo_rows, write_jsonl

    root = tmp_path_factory.mktemp("report-runs")
    model = tiny_model_factory("llama")
    chat = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yes fox"}]}
            for i in range(16)]
    training = {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 1, "grad_ckpt": False, "learning_rate": 1e-2}
    recipes = {
        "sft": {"data": {"path": write_jsonl(root / "chat.jsonl", chat), "seq_len": 64, "eval_fraction": 0.25},
                "eval": {"every_steps": 4}},
        "dpo": {"task": "dpo", "data": {"path": write_jsonl(root / "dpo.jsonl", dpo_rows(24, 1)), "seq_len": 64,
                                        "eval_path": write_jsonl(root / "dpo_eval.jsonl", dpo_rows(8, 2))}},
    }
    out = {}
    for name, tree in recipes.items():
        tree = {"name": name, "model": {"name_or_path": model}, "adapter": {"rank": 4}, "training": training,
                "output_dir": str(root / "runs" / "{name}"), **tree}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree), encoding="utf-8")
        assert _cli(["train", str(path)]) == 0
        out[name] = root / "runs" / name
    held = write_jsonl(root / "held.jsonl", chat[:4])
    assert _cli(["eval", str(out["sft"]), "--data", held, "--baseline", "--max-new-tokens", "4"]) == 0
    return out


@pytest.fixture()
def synthetic_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: run\nmodel:\n  name_or_path: x\n", encoding="utf-8")
    write_metrics(run, steps=20)
    (run / "eval.json").write_text(json.dumps(EVAL), encoding="utf-8")
    return run


def test_report_sections_escaping_and_one_point_per_step(synthetic_run):
    from onecard.eval.report import write_report

    html = write_report(synthetic_run).read_text(encoding="utf-8")
    for chart in ("loss", "tokens_per_s", "memory", "plan_components"):
        assert f'data-chart="{chart}"' in html
    assert 'data-series="train loss"' in html and 'data-series="held-out loss"' in html
    assert "+50.0 pt" in html and "before (base)" in html and "token F1" in html
    assert "<script>alert" not in html and "&lt;script&gt;" in html  # user text is escaped
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing fetched from the network
    path = re.search(r'data-series="train loss" d="([^"]+)"', html).group(1)
    assert path.count("L") == 19


def test_report_without_eval_or_plan_says_so(tmp_path):
    from onecard.eval.report import write_report

    run = tmp_path / "r"
    run.mkdir()
    write_metrics(run, steps=3, with_eval=False, plan=False)
    html = write_report(run, tmp_path / "out.html").read_text(encoding="utf-8")
    assert "No eval.json" in html and "No memory plan" in html and 'data-series="held-out loss"' not in html


def test_axes_cover_every_point():
    """The ticks span the data for any range, so no point is drawn outside the plot (over the title or legend)."""
    import random

    from onecard.eval.svg import nice_ticks

    rng = random.Random(0)
    for _ in range(2000):
        lo = rng.uniform(-1e3, 1e3) * 10 ** rng.randint(-6, 3)
        hi = lo + abs(rng.gauss(0, 1)) * 10 ** rng.randint(-6, 4)
        ticks = nice_ticks(lo, hi)
        assert ticks[0] <= lo and ticks[-1] >= hi, (lo, hi, ticks)
        assert 2 <= len(ticks) <= 12


def test_cpu_run_is_not_compared_with_a_gpu_plan(runs, tmp_path):
    """On CPU the measured peak is the process RSS: the page says so and shows no planned/measured ratio."""
    assert _cli(["report", str(runs["sft"]), "--out", str(tmp_path / "sft.html")]) == 0
    html = (tmp_path / "sft.html").read_text(encoding="utf-8")
    summary = json.loads((runs["sft"] / "summary.json").read_text())
    assert summary["peak_memory_kind"] == "process_peak_rss" and summary["plan"]["gpu"] == "rtx4090"
    assert "measured / planned" not in html and "Not compared with the plan" in html
    assert 'data-chart="memory_plan"' not in html  # no planned-vs-measured bars


def test_data_section_draws_the_length_histogram_of_the_trained_data(runs, tmp_path):
    from onecard.eval.report import render_report

    summary = json.loads((runs["sft"] / "summary.json").read_text())
    data = summary["data_summary"]
    assert sum(data["histogram"]["counts"]) == data["records"] == 12  # 16 records less the 25% eval split
    html = render_report(runs["sft"])
    chart = html[html.index('data-chart="length_histogram"'):]
    chart = chart[:chart.index("</svg>")]
    assert chart.count('class="series bar') == len(data["histogram"]["counts"])
    assert f"{data['trained_fraction']:.1%}" in html and "packing is off" in html
    dpo = render_report(runs["dpo"])  # a preference run has no prepared-data summary: said, not drawn
    assert 'data-chart="length_histogram"' not in dpo and "No data statistics" in dpo


def test_cuda_run_compares_plan_and_measurement_at_its_shapes(runs, tmp_path):
    import shutil as sh

    from onecard.eval.report import render_report

    run = tmp_path / "cuda-run"
    sh.copytree(runs["sft"], run)
    summary = json.loads((run / "summary.json").read_text())
    summary.update({"device": "cuda:0", "peak_memory_kind": "cuda_max_memory_reserved",
                    "plan_vs_measured": {"gpu": "h200", "predicted_peak_reserved_gib": 2.0,
                                         "measured_peak_reserved_gib": 2.5, "planned_seq_len": {"memory": 37}}})
    (run / "summary.json").write_text(json.dumps(summary))
    html = render_report(run)
    assert 'data-chart="memory_plan"' in html and "+25%" in html and "37 tokens" in html
    assert "Not compared" not in html


def test_dpo_report_charts_rewards_margin_and_accuracy(runs, tmp_path):
    assert _cli(["report", str(runs["dpo"]), "--out", str(tmp_path / "dpo.html")]) == 0
    html = (tmp_path / "dpo.html").read_text(encoding="utf-8")
    records = [json.loads(line) for line in (runs["dpo"] / "metrics.jsonl").read_text().splitlines()]
    for chart, series, key in (("rewards", "chosen", "reward_chosen"), ("rewards", "rejected", "reward_rejected"),
                               ("reward_margin", "margin (train batch)", "reward_margin"),
                               ("reward_accuracy", "accuracy (train batch)", "reward_accuracy"),
                               ("loss", "train loss", "loss")):
        svg = re.search(rf'<svg[^>]*data-chart="{chart}".*?</svg>', html).group(0)
        drawn = re.findall(rf'<circle class="point" data-series="{re.escape(series)}"', svg)
        assert len(drawn) == sum(1 for r in records if key in r) == STEPS, (chart, series)
    summary = json.loads((runs["dpo"] / "summary.json").read_text())
    assert f"{summary['eval_reward_accuracy']:.1%}" in html  # the held-out preference metrics are in the table


def test_report_cli_and_missing_dir(runs, tmp_path):
    assert _cli(["report", str(runs["sft"]), "--out", str(tmp_path / "r.html")]) == 0
    assert "<svg" in (tmp_path / "r.html").read_text(encoding="utf-8")
    assert _cli(["report", str(tmp_path / "nope")]) == 2


# --------------------------------------------------------------------------- layout, measured in Chromium

MEASURE = """<script>
const box = e => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
const charts = [...document.querySelectorAll('svg.chart')].map(svg => ({
  name: svg.dataset.chart, box: box(svg),
  plot: svg.querySelector('rect.plot-area') ? box(svg.querySelector('rect.plot-area')) : null,
  texts: [...svg.querySelectorAll('text')].map(t => ({cls: t.getAttribute('class'), text: t.textContent, box: box(t)})),
  series: [...svg.querySelectorAll('path.series')].map(p => ({label: p.dataset.series, box: box(p)})),
  points: [...svg.querySelectorAll('circle.point')].map(c => ({label: c.dataset.series,
    cx: (box(c)[0] + box(c)[2]) / 2, cy: (box(c)[1] + box(c)[3]) / 2})),
}));
const recipe = document.querySelector('pre.recipe');
if (recipe) recipe.remove();
const layout = {charts, scroll_width: document.documentElement.scrollWidth, inner_width: window.innerWidth,
                text: document.body.innerText};
const out = document.createElement('pre'); out.id = 'layout'; out.textContent = JSON.stringify(layout);
document.body.appendChild(out);
</script>"""


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _chromium_cmd(tmp_path, width: int) -> list[str]:
    return [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},2000"]


def measure_layout(page, tmp_path, width: int) -> dict:
    """Element boxes of the page as Chromium lays it out at ``width`` CSS pixels (the measuring script is added to a copy)."""
    probe = tmp_path / f"probe-{width}.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    dom = subprocess.run(_chromium_cmd(tmp_path, width) + ["--dump-dom", probe.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    found = re.search(r'<pre id="layout">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    import html as html_lib

    return json.loads(html_lib.unescape(found.group(1)))


def _inside(inner, outer, tol=0.5) -> bool:
    return inner[0] >= outer[0] - tol and inner[1] >= outer[1] - tol and inner[2] <= outer[2] + tol and inner[3] <= outer[3] + tol


def _overlap(a, b, tol=0.5) -> bool:
    return a[0] < b[2] - tol and b[0] < a[2] - tol and a[1] < b[3] - tol and b[1] < a[3] - tol


def layout_problems(layout: dict) -> list[str]:
    """Every clipped label, overlapping text, point or line outside its plot, line over a title or legend."""
    problems = []
    if layout["scroll_width"] > layout["inner_width"]:
        problems.append(f"page scrolls sideways: {layout['scroll_width']} > {layout['inner_width']} px")
    for chart in layout["charts"]:
        name, texts = chart["name"], chart["texts"]
        problems += [f"{name}: text {t['text']!r} cut by the chart edge {t['box']} vs {chart['box']}"
                     for t in texts if not _inside(t["box"], chart["box"])]
        problems += [f"{name}: texts {a['text']!r} and {b['text']!r} overlap"
                     for i, a in enumerate(texts) for b in texts[i + 1:] if _overlap(a["box"], b["box"])]
        problems += [f"{name}: series {s['label']!r} drawn outside the chart" for s in chart["series"]
                     if not _inside(s["box"], chart["box"])]
        if chart["plot"] is None:
            continue
        plot, heads = chart["plot"], [t for t in texts if t["cls"] in ("title", "legend")]
        problems += [f"{name}: series {s['label']!r} leaves the plot area" for s in chart["series"]
                     if not _inside(s["box"], plot)]
        problems += [f"{name}: point of {p['label']!r} outside the plot area" for p in chart["points"]
                     if not _inside([p["cx"], p["cy"], p["cx"], p["cy"]], plot)]
        problems += [f"{name}: series {s['label']!r} runs over {t['text']!r}" for s in chart["series"] for t in heads
                     if _overlap(s["box"], t["box"])]
    return problems


def raw_keys_shown(layout: dict, run) -> set[str]:
    """metrics/summary/eval keys with an underscore that appear as words in the page's visible text."""
    keys = set()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        keys |= set(json.loads(line))
    keys |= set(json.loads((run / "summary.json").read_text()))
    if (run / "eval.json").is_file():
        keys |= set(json.loads((run / "eval.json").read_text())["tuned"])
    words = set(re.findall(r"[A-Za-z0-9_]+", layout["text"]))
    return {k for k in keys if "_" in k and k in words}


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (Debian package: chromium)")
@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_report_layout_in_headless_chromium(runs, tmp_path, name):
    page = tmp_path / f"{name}.html"
    assert _cli(["report", str(runs[name]), "--out", str(page)]) == 0
    for width in (1100, 480):  # a laptop window and a phone
        layout = measure_layout(page, tmp_path, width)
        charts = {c["name"] for c in layout["charts"]}
        assert {"loss", "tokens_per_s", "memory", "plan_components"} <= charts
        if name == "dpo":
            assert {"rewards", "reward_margin", "reward_accuracy"} <= charts
        assert layout_problems(layout) == [], width
        assert raw_keys_shown(layout, runs[name]) == set()
        loss = next(c for c in layout["charts"] if c["name"] == "loss")
        assert sum(p["label"] == "train loss" for p in loss["points"]) == STEPS  # the first points included
