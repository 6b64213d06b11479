"""onecard report: one self-contained HTML page; rendered in headless Chromium when it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from onecard_run_fixtures import write_metrics

EVAL = {"data": "eval.jsonl", "examples": {"loss": 4, "generation": 2},
        "decoding": {"strategy": "greedy", "max_new_tokens": 16, "seed": 0},
        "tuned": {"loss": 0.5, "perplexity": 1.65, "exact_match": 0.5, "token_f1": 0.6, "rouge_l": 0.6},
        "baseline": {"loss": 2.0, "perplexity": 7.39, "exact_match": 0.0, "token_f1": 0.1, "rouge_l": 0.1},
        "delta": {"loss": -1.5, "perplexity": -5.74, "exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.5},
        "samples": [{"prompt": "2+2 <script>alert(1)</script>", "reference": "4", "baseline": "five", "tuned": "4"}]}


@pytest.fixture()
def run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: run\nmodel:\n  name_or_path: x\n", encoding="utf-8")
    write_metrics(run, steps=20)
    (run / "eval.json").write_text(json.dumps(EVAL), encoding="utf-8")
    return run


def test_report_has_all_sections_and_is_self_contained(run):
    from onecard.eval.report import write_report

    html = write_report(run).read_text(encoding="utf-8")
    for chart in ("loss", "tokens_per_s", "memory", "memory_plan"):
        assert f'data-chart="{chart}"' in html
    assert 'data-series="train loss"' in html and 'data-series="eval loss"' in html
    assert "measured / planned" in html and "+50.0 pt" in html and "before (base)" in html
    assert "<script>alert" not in html and "&lt;script&gt;" in html  # user text is escaped
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing fetched from the network
    # the train-loss path has one point per logged step
    path = re.search(r'data-series="train loss" d="([^"]+)"', html).group(1)
    assert path.count("L") == 19


def test_report_without_eval_or_plan_says_so(tmp_path):
    from onecard.eval.report import write_report

    run = tmp_path / "r"
    run.mkdir()
    write_metrics(run, steps=3, with_eval=False, plan=False)
    html = write_report(run, tmp_path / "out.html").read_text(encoding="utf-8")
    assert "No eval.json" in html and "No memory plan" in html and 'data-series="eval loss"' not in html


def test_report_cli_and_missing_dir(run, tmp_path):
    from onecard.cli import main

    main(["report", str(run), "--out", str(tmp_path / "r.html")])
    assert (tmp_path / "r.html").stat().st_size > 1000
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "nope")])
    assert exc.value.code == 2


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (Debian package: chromium)")
def test_report_renders_in_headless_chromium(run, tmp_path):
    from onecard.eval.report import write_report

    page = write_report(run)
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=90).stdout
    charts = re.findall(r'<svg[^>]*class="chart"[^>]*data-chart="([^"]+)"', dom)
    assert {"loss", "tokens_per_s", "memory", "memory_plan"} <= set(charts)
    assert len(re.findall(r'<path[^>]*class="series', dom)) >= 5
    shot = tmp_path / "shot.png"
    subprocess.run(cmd[:-2] + [f"--screenshot={shot}", "--window-size=1000,2400", page.as_uri()],
                   capture_output=True, timeout=90)
    assert shot.is_file() and shot.stat().st_size > 10_000  # something was painted
