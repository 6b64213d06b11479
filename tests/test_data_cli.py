"""`onecard data RECIPE`: prepares the cache ahead of training, reports what it did, --stats, --json."""

from __future__ import annotations

import json

import yaml

from onecard.cli import main


def write_recipe(tmp_path, model_dir, n=30, **data):
    rows = [{"messages": [{"role": "user", "content": f"question {i} " + "word " * (i % 7)},
                          {"role": "assistant", "content": "answer " * (1 + i % 9)}]} for i in range(n)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tree = {"model": {"name_or_path": model_dir}, "data": {"path": str(path), "seq_len": 64, **data},
            "output_dir": str(tmp_path / "run")}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return recipe


def run_json(argv, capsys):
    main(argv)
    return json.loads(capsys.readouterr().out)


def test_data_json_then_the_cache_then_train_uses_it(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.setenv("ONECARD_DATA_CACHE", str(tmp_path / "cache"))
    recipe = write_recipe(tmp_path, tiny_llama_dir, packing=True, eval_fraction=0.2)
    first = run_json(["data", str(recipe), "--json"], capsys)
    assert set(first["splits"]) == {"train", "eval"}
    train = first["splits"]["train"]
    assert not train["from_cache"] and train["records"] == 24 and first["splits"]["eval"]["records"] == 6
    assert train["packing"]["enabled"] and not first["splits"]["eval"]["packing"]["enabled"]
    second = run_json(["data", str(recipe), "--json"], capsys)
    assert second["splits"]["train"]["from_cache"] and second["splits"]["train"]["cache"] == train["cache"]

    from onecard.data import build_dataset
    from onecard.recipe import load_recipe
    from onecard.train.model import load_model_and_tokenizer

    recipe_obj = load_recipe(recipe, [])
    _, tokenizer = load_model_and_tokenizer(recipe_obj, "cpu")  # what onecard train builds with
    ds = build_dataset(recipe_obj, tokenizer)
    assert ds.from_cache and str(ds.entry) == train["cache"]


def test_data_stats_prints_histogram_and_counts(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.setenv("ONECARD_DATA_CACHE", str(tmp_path / "cache"))
    recipe = write_recipe(tmp_path, tiny_llama_dir, n=40)
    main(["data", str(recipe), "--stats", "--set", "data.seq_len=48"])
    out = capsys.readouterr().out
    summary = run_json(["data", str(recipe), "--json", "--set", "data.seq_len=48"], capsys)["splits"]["train"]
    assert summary["truncated"] > 0
    for label in ("truncated (> seq_len)", "trained", "packing efficiency", "with data.packing: true", "<- seq_len"):
        assert label in out
    assert f"{summary['truncated']:,} (seq_len 48)" in out
    bins = [line.split("<-")[0].split() for line in out.splitlines() if line.startswith("  ") and "-" in line.split()[0]]
    assert sum(int(b[-1].replace(",", "")) for b in bins) == 40  # the histogram counts every record
