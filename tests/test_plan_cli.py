"""`onecard plan` / `scope` / `gpus` / `models` from the command line: outputs, outcomes and speed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

CLI = [sys.executable, "-m", "onecard.cli"]
CASE = ["--model", "llama-3-8b", "--method", "lora", "--rank", "16", "--seq", "2048", "--batch", "8", "--gpu", "rtx4090"]


def run(*args, check=True):
    proc = subprocess.run(CLI + list(args), capture_output=True, text=True, env=_env())
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _env():
    import os

    return {**os.environ, "COLUMNS": "200"}


def _fastest_s(*args, repeats=3) -> float:
    """Best of a few runs: the CI box is shared, and it is the command's own cost we bound."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(*args)
        best = min(best, time.perf_counter() - start)
    return best


def test_plan_prints_every_component_and_verdict():
    out = run("plan", *CASE, "--kernels", "none").stdout
    for label in ("base weights", "adapter weights", "gradients", "optimizer state", "saved activations",
                  "logits + cross-entropy", "workspace", "allocator slack", "CUDA context", "verdict: does not fit",
                  "Changes that make it fit"):
        assert label in out, label


def test_plan_json_outcomes():
    plain8 = json.loads(run("plan", *CASE, "--kernels", "none", "--json").stdout)
    assert plain8["memory"]["verdict"] == "does not fit" and plain8["suggestions"]
    plain1 = json.loads(run("plan", *CASE, "--kernels", "none", "--batch", "1", "--json").stdout)
    assert plain1["memory"]["verdict"] in ("fits", "tight")
    qlora70 = json.loads(run("plan", "--model", "llama-3-70b", "--method", "qlora", "--batch", "1",
                             "--gpu", "rtx4090", "--json").stdout)
    assert qlora70["memory"]["verdict"] == "does not fit"


def test_plan_recipe_file_and_set(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: llama-3.2-1b}\nmethod: full\nplan: {gpu: h100-sxm}\n")
    out = json.loads(run("plan", str(recipe), "--set", "training.optimizer=adamw_8bit", "--json").stdout)
    assert out["memory"]["gpu"] == "h100-sxm" and out["memory"]["optimizer"] == "adamw_8bit"


def test_plan_local_model_dir(tiny_llama_dir):
    out = json.loads(run("plan", "--model", tiny_llama_dir, "--json").stdout)
    assert out["memory"]["verdict"] == "fits"


def test_plan_user_errors_exit_2():
    assert run("plan", check=False).returncode == 2
    assert run("plan", "--model", "no-such-model", check=False).returncode == 2
    assert run("plan", "--model", "llama-3-8b", "--gpu", "tpu9", check=False).returncode == 2


def test_plan_json_answers_under_1s():
    assert _fastest_s("plan", *CASE, "--json") < 1.0


def test_scope_4090_under_1s_and_computed():
    assert _fastest_s("scope", "--gpu", "rtx4090") < 1.0
    small = json.loads(run("scope", "--gpu", "rtx4090", "--json").stdout)
    big = json.loads(run("scope", "--gpu", "h200", "--json").stdout)
    rows = {r["method"]: r for r in small["rows"]}
    assert set(rows) == {"lora", "qlora", "dora", "full", "pretrain", "dpo"}
    assert rows["qlora"]["largest_dense_params_b"] > rows["lora"]["largest_dense_params_b"] > \
        rows["full"]["largest_dense_params_b"]
    for row in big["rows"]:  # a bigger card fits bigger models: the table is computed, not stored
        assert row["largest_dense_params_b"] > rows[row["method"]]["largest_dense_params_b"]
    claim = next(c for c in small["claims"] if "70B" in c["claim"])
    assert not claim["fits"] and "NF4 weights alone" in claim["why"] and claim["would_work"]


def test_gpus_and_models_list():
    gpus = json.loads(run("gpus", "--json").stdout)
    assert {g["id"] for g in gpus} >= {"rtx4090", "rtx5090", "l4", "a100-40gb", "a100-80gb", "h100-sxm", "h200"}
    models = json.loads(run("models", "--json").stdout)
    assert {m["id"] for m in models} >= {"llama-3-8b", "llama-3-70b", "llama-3.2-1b", "llama-3.2-3b", "mistral-7b",
                                          "qwen2.5-7b", "qwen2.5-14b", "gemma-2-9b"}
    assert "rtx4090" in run("gpus").stdout and "llama-3-8b" in run("models").stdout
