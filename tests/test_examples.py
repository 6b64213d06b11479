"""Every shipped example recipe validates; the named workloads plan end to end on an RTX 4090 and an H200."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onecard.recipe import load_recipe

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
NAMED = ["llama3-8b-instruct.yaml", "qwen2.5-14b-domain.yaml", "llama3-70b-qlora.yaml"]
LABELS = {"measured", "calibrated", "extrapolated", "estimated"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_shipped_example_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem  # set in the file (the default is "run"): runs/<name> says which example ran


def test_named_workloads_are_shipped():
    names = {p.name for p in EXAMPLES}
    assert set(NAMED) <= names
    for name, model, n in (("llama3-8b-instruct.yaml", "llama-3-8b", 50_000),
                           ("qwen2.5-14b-domain.yaml", "qwen2.5-14b", 30_000),
                           ("llama3-70b-qlora.yaml", "llama-3-70b", 50_000)):
        r = load_recipe(Path(EXAMPLES[0].parent, name))
        assert (r.model.name_or_path, r.data.num_examples, r.data.seq_len) == (model, n, 2048)
        assert r.data.mean_tokens_per_example and r.plan.gpu
    assert load_recipe(Path(EXAMPLES[0].parent, "llama3-70b-qlora.yaml")).method == "qlora"
    r8 = load_recipe(Path(EXAMPLES[0].parent, "llama3-8b-instruct.yaml"))
    assert r8.training.micro_batch_size * r8.training.grad_accum == 8


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("gpu", ["rtx4090", "h200"])
def test_plan_json_gives_memory_speed_time_cost_with_labels(name, gpu):
    from onecard.cli import app

    path = Path(EXAMPLES[0].parent, name)
    res = CliRunner().invoke(app, ["plan", str(path), "--gpu", gpu, "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["memory"]["verdict"] in ("fits", "tight", "does not fit") and d["memory"]["label"] == "estimated"
    sp, tm, cs = d["time_cost"]["speed"], d["time_cost"]["time"], d["time_cost"]["cost"]
    streams = d.get("verdict") == "fits with streaming"  # speed, time and cost are the streamed run's
    assert sp["gpu"] == gpu and sp["label"].removesuffix(" + streaming" if streams else "") in LABELS
    assert 0 < sp["estimate_tokens_per_s"] <= sp["ceiling_tokens_per_s"]
    assert tm["hours_per_epoch"] > 0 and tm["label"] == sp["label"]
    assert tm["total_hours"] == pytest.approx(tm["hours_per_epoch"] * tm["epochs"])
    own = cs["your_card"]
    assert own["label"] == "estimated"
    fits = d["memory"]["verdict"] != "does not fit" or streams
    assert (own["per_job"] is not None) == fits
    if fits:
        assert own["per_job"] > 0
    costed = [r for r in cs["cloud"] if r["cost"]]
    assert costed and all(r["cost"]["per_job"] > 0 and r["speed_label"].removesuffix(" + streaming") in LABELS
                          for r in costed)
    if name in ("llama3-70b-qlora.yaml", "qwen2.5-14b-domain.yaml") and gpu == "rtx4090":
        assert d["memory"]["verdict"] == "does not fit"  # without streaming; the seed's workloads stream on a 4090
        assert streams and own["per_job"] > 0
        st = d["streaming"]
        assert st["verdict"] == "fits with streaming" and st["label"] == "estimated"
        assert st["hours_per_epoch"] > 0 and st["cloud_cost_per_epoch"]["amount"] > 0
    else:
        assert "streaming" not in d or d["memory"]["verdict"] == "does not fit"
