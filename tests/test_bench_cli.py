"""`onecard bench --cpu` runs a tiny model end to end and its JSON line has every field; the suite file is sound."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from onecard.bench.config import BenchConfig
from onecard.bench.run import BASELINE_FIELDS, RESULT_FIELDS, load_suite
from onecard.cli import app

SUITE = "src/onecard/bench/suite.yaml"


def _invoke(args):
    return CliRunner().invoke(app, args, catch_exceptions=False)


def test_bench_cpu_json_has_every_field(tmp_path):
    out = tmp_path / "r.jsonl"
    res = _invoke(["bench", "--cpu", "--json", "--steps", "2", "--warmup", "1", "--seq", "32", "--baseline",
                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    record = json.loads(out.read_text().splitlines()[0])
    for key in RESULT_FIELDS + BASELINE_FIELDS:
        assert key in record, key
    assert record["status"] == "ok" and record["baseline_status"] == "ok"
    assert record["tokens_per_s"] > 0 and record["s_per_step"] > 0
    assert record["micro_batch"] == 1 and record["seq"] == 32 and record["model"] == "tiny"
    assert record["versions"]["torch"] and record["command"].startswith("onecard bench")
    # a real optimizer step ran: the loss moved (LoRA B starts at zero, so the first step changes nothing)
    assert record["loss_last"] != record["loss_first"]


def test_bench_without_cuda_exits_2():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = CliRunner().invoke(app, ["bench", "--model", "llama-3-8b"])
    assert res.exit_code != 0
    assert "CUDA" in str(res.exception) or "CUDA" in res.output


def test_suite_lists_the_issue_matrix():
    matrix = [c for c in load_suite(SUITE) if c.group == "matrix"]
    assert len(matrix) >= 12
    assert {c.method for c in matrix} == {"lora", "qlora", "dora", "full"}
    assert {"llama-3-8b", "qwen2.5-7b", "llama-3.2-1b"} <= {c.model for c in matrix}
    assert {512, 2048, 4096} <= {c.seq for c in matrix} and {1, 4, 8} <= {c.micro_batch for c in matrix}
    assert {True, False} == {c.grad_ckpt for c in matrix} and {"none", "onecard"} == {c.kernels for c in matrix}
    throughput = [c for c in load_suite(SUITE) if c.group == "throughput"]
    assert {(c.model, c.method, c.micro_batch) for c in throughput} == {
        ("llama-3-8b", "lora", 8), ("mistral-7b", "lora", 8), ("qwen2.5-14b", "lora", 2),
        ("llama-3-8b", "qlora", 8), ("llama-3-70b", "qlora", 1)}
    assert all(c.baseline for c in throughput)


def test_every_suite_config_is_a_valid_recipe():
    for cfg in load_suite(SUITE):
        assert cfg.to_recipe().method == cfg.method
        assert "onecard bench --model" in cfg.command()


def test_bad_config_is_a_user_error():
    from onecard.errors import UserError

    with pytest.raises(UserError):
        BenchConfig(model="llama-3-8b", method="lorax")


def test_nf4_layer_by_layer_build_on_cpu():
    """The QLoRA builder: meta skeleton, per-layer bf16 -> NF4 Linear4bit, then peft LoRA on top (tiny, CPU)."""
    pytest.importorskip("bitsandbytes")
    from onecard.bench.build import build_model
    from onecard.bench.step import random_batch, timed_steps

    model, vocab = build_model(BenchConfig(model="tiny", method="qlora", seq=16, micro_batch=2), "cpu")
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds
    assert not any(p.is_meta for p in model.parameters())
    out = timed_steps(model, random_batch(vocab, 2, 16, "cpu"), steps=1, warmup=1, device="cpu", loss_path="spine")
    assert out["tokens_per_s"] > 0


def test_probe_picks_the_fastest_setting_that_fits_and_stops_a_line_at_oom():
    """The search logic, with a fake GPU: bigger micro-batches are faster until 8, which runs out of memory."""
    from onecard.bench.probe import probe
    from onecard.recipe import validate_recipe

    recipe = validate_recipe({"model": {"name_or_path": "llama-3-8b"}, "method": "qlora", "data": {"seq_len": 1024}})
    calls = []

    def fake_measure(cfg):
        calls.append((cfg.micro_batch, cfg.grad_ckpt, cfg.kernels))
        if cfg.micro_batch >= 8:
            return {"status": "oom"}
        speed = cfg.micro_batch * 100 * (1.3 if cfg.kernels == "onecard" else 1.0) * (0.8 if cfg.grad_ckpt else 1.0)
        return {"status": "ok", "tokens_per_s": speed, "peak_reserved_gib": 10.0}

    out = probe(recipe, cap_gib=24, gpu="rtx4090", measure=fake_measure)
    assert out["best"]["micro_batch"] == 4 and out["best"]["kernels"] == "onecard"
    ok = [t for t in out["tried"] if t["status"] == "ok"]
    assert out["best"]["tokens_per_s"] == max(t["tokens_per_s"] for t in ok)
    assert "training.micro_batch_size=4" in out["set"]
    assert not any(mb == 16 for mb, _, _ in calls)  # the line stopped at its first OOM (8)
    assert all(t["planned_gib"] <= 24 * 1.1 for t in out["tried"])


def test_probe_tries_offloaded_checkpoints_and_says_how_to_get_them():
    """Offloaded checkpoints are a line of their own, tried before checkpoints kept on the GPU; when they measure
    fastest the answer turns them on, and the printed summary says which setting each row was."""
    from onecard.bench.probe import CHECKPOINTING, candidates, probe, summary_lines
    from onecard.bench.config import config_from_recipe
    from onecard.recipe import validate_recipe

    recipe = validate_recipe({"model": {"name_or_path": "llama-3-8b"}, "data": {"seq_len": 2048}})
    base = config_from_recipe(recipe, seq=2048, steps=1, warmup=0, gpu="rtx4090")
    order = [(c.grad_ckpt, c.offload_activations) for c, _ in candidates(base, 24, "rtx4090") if c.kernels == "onecard"]
    assert (True, True) in order and order.index((True, True)) < order.index((True, False))
    assert sorted(set(order), key=CHECKPOINTING.index) == [o for o in CHECKPOINTING if o in order]

    def fake_measure(cfg):
        if not cfg.grad_ckpt and cfg.micro_batch > 1:
            return {"status": "oom"}
        speed = cfg.micro_batch * 100 * (1.05 if cfg.offload_activations else 1.0)
        return {"status": "ok", "tokens_per_s": speed, "peak_reserved_gib": 20.0}

    out = probe(recipe, cap_gib=24, gpu="rtx4090", measure=fake_measure)
    assert out["best"]["offload_activations"] and "training.offload_activations=true" in out["set"]
    text = "\n".join(summary_lines(out, 24))
    assert "checkpointing offloaded" in text and "--set training.offload_activations=true" in text


def test_probe_ends_a_line_once_doubling_the_micro_batch_stops_paying():
    """Saturation: b2 no faster than b1 (within 3%) means b4 and up are not measured on that line."""
    from onecard.bench.probe import probe
    from onecard.recipe import validate_recipe

    recipe = validate_recipe({"model": {"name_or_path": "llama-3-8b"}, "method": "qlora", "data": {"seq_len": 1024}})
    calls = []

    def flat_measure(cfg):
        calls.append((cfg.micro_batch, (cfg.grad_ckpt, cfg.offload_activations, cfg.kernels,
                                        cfg.uncheckpointed_layers > 0)))
        return {"status": "ok", "tokens_per_s": 1000.0 + cfg.micro_batch, "peak_reserved_gib": 10.0}

    out = probe(recipe, cap_gib=24, gpu="rtx4090", measure=flat_measure)
    per_line = {}
    for mb, line in calls:
        per_line.setdefault(line, []).append(mb)
    # each line stops at its second micro-batch (a partly checkpointed line starts where not all layers fit)
    assert all(len(mbs) <= 2 for mbs in per_line.values()), per_line
    assert out["best"]["status"] == "ok"


def test_plan_probe_without_cuda_is_a_user_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from onecard.errors import UserError

    res = CliRunner().invoke(app, ["plan", "--model", "llama-3-8b", "--probe"])
    assert isinstance(res.exception, UserError) and "CUDA" in str(res.exception)  # the CLI's main exits 2


def test_probe_tries_streamed_weights_when_nothing_else_fits_and_says_how_to_get_them():
    """Llama 3 70B QLoRA does not fit a 24 GiB card: the only candidates stream the base weights (resident layers
    from the planner), the answer turns streaming on; with training.offload_weights: false nothing is tried."""
    from onecard.bench.probe import probe, summary_lines
    from onecard.recipe import validate_recipe

    tree = {"model": {"name_or_path": "llama-3-70b"}, "method": "qlora", "data": {"seq_len": 2048}}
    seen = []

    def fake_measure(cfg):
        seen.append(cfg)
        return {"status": "ok", "tokens_per_s": 1000.0 / cfg.micro_batch ** 0.1, "peak_reserved_gib": 21.0}

    out = probe(validate_recipe(tree), cap_gib=24, gpu="rtx4090", measure=fake_measure)
    assert seen and all(c.offload_weights and c.grad_ckpt and 0 < c.resident_layers < 80 for c in seen)
    assert "training.offload_weights=true" in out["set"]
    assert "streamed weights (" in "\n".join(summary_lines(out, 24))
    seen.clear()
    tree["training"] = {"offload_weights": False}
    off = probe(validate_recipe(tree), cap_gib=24, gpu="rtx4090", measure=fake_measure)
    assert off["best"] is None and not seen


def test_probe_of_a_cuda_graph_recipe_graphs_the_settings_a_graph_can_hold():
    """training.cuda_graph: each candidate with onecard's kernels and no host copies is measured replayed from a
    graph; offloaded checkpoints, streamed weights and the unpatched kernels run eager (a graph cannot hold them),
    and the answer says whether the pick keeps the graph. A recipe without the field never gets a graph."""
    from onecard.bench.probe import probe, summary_lines
    from onecard.recipe import validate_recipe

    tree = {"model": {"name_or_path": "llama-3-8b"}, "data": {"seq_len": 2048},
            "training": {"kernels": "onecard", "cuda_graph": True}}
    measured = []

    def fake_measure(cfg):
        measured.append(cfg)
        rate = min(cfg.micro_batch, 4) * 100 * (1.5 if cfg.cuda_graph else 1.0)  # the card saturates at 4
        return {"status": "ok", "tokens_per_s": rate, "peak_reserved_gib": 20.0}

    out = probe(validate_recipe(tree), cap_gib=24, gpu="rtx4090", measure=fake_measure)
    for cfg in measured:
        assert cfg.cuda_graph == (cfg.kernels == "onecard" and not cfg.offload_activations and not cfg.offload_weights)
    assert any(c.cuda_graph for c in measured) and any(c.offload_activations for c in measured)
    assert out["best"]["cuda_graph"] and "training.cuda_graph=true" in out["set"]
    assert "CUDA graph" in "\n".join(summary_lines(out, 24))
    measured.clear()
    tree["training"]["cuda_graph"] = False
    out = probe(validate_recipe(tree), cap_gib=24, gpu="rtx4090", measure=fake_measure)
    assert not any(c.cuda_graph for c in measured) and not any("cuda_graph" in s for s in out["set"])
