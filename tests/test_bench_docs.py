"""docs/benchmarks.{md,json} are generated from the committed measurements and name each row's command."""

from __future__ import annotations

import json
from pathlib import Path

from onecard.bench.calibrate import load_records
from onecard.bench.report import measured_rows

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_docs_json_matches_the_raw_results():
    doc = json.loads((DOCS / "benchmarks.json").read_text())
    fresh = measured_rows(load_records())
    assert [(r["model"], r["method"], r["seq"], r["batch"], r["tokens_per_s"], r["peak_reserved_gib"])
            for r in fresh] == [(r["model"], r["method"], r["seq"], r["batch"], r["tokens_per_s"],
                                 r["peak_reserved_gib"]) for r in doc["measured"]]
    assert doc["versions"]["gpu"] == "NVIDIA H200"
    assert all(r["label"].startswith("calibrated estimate") for r in doc["rtx4090"])


def test_every_measured_row_names_its_command():
    text = (DOCS / "benchmarks.md").read_text()
    for row in json.loads((DOCS / "benchmarks.json").read_text())["measured"]:
        assert row["command"].startswith("onecard bench --model")
        assert row["command"] in text
    assert "NOT measured" in text and "RTX 4090" in text
