"""Planner terms for streamed base weights (plan/streaming.py): bytes, resident count, host RAM, speed, fixes."""

from __future__ import annotations

import json

import pytest

from onecard.catalog.models import find_preset
from onecard.plan.inputs import PlanInputs
from onecard.plan.memory import GIB, TIGHT_FRACTION, plan_memory
from onecard.plan.streaming import (HOST_USABLE_FRACTION, host_ram_check, layer_stream_bytes, plan_streaming,
                                    streaming_section, streamed_tokens_per_s)


def _inputs(model="llama-3-70b", method="qlora", gpu="rtx4090", **kw):
    from onecard.catalog.gpus import get_gpu

    return PlanInputs(shape=find_preset(model), gpu=get_gpu(gpu), method=method, **kw)


def test_layer_bytes_nf4_is_packed_plus_absmax_and_bf16_is_two_bytes():
    p = _inputs()
    numels = [i * o for _, i, o in p.shape.linear_layers_per_block()]
    assert layer_stream_bytes(p.with_(method="lora")) == 2 * sum(numels)
    nf4 = layer_stream_bytes(p)
    assert nf4 == sum(n // 2 + -(-n // 64) for n in numels)
    assert 0.25 < nf4 / layer_stream_bytes(p.with_(method="lora")) < 0.26


@pytest.mark.parametrize("model,method,mb", [("llama-3-70b", "qlora", 1), ("qwen2.5-14b", "lora", 2)])
def test_the_seed_workloads_fit_a_4090_with_streaming_and_the_most_resident_layers(model, method, mb):
    mem = plan_memory(_inputs(model, method, micro_batch=mb))
    assert not mem.fits
    sp = plan_streaming(mem)
    limit = (1 - TIGHT_FRACTION) * mem.capacity_bytes
    assert sp.verdict == "fits with streaming" and 0 < sp.resident_layers < mem.inputs.shape.num_hidden_layers
    assert sp.device_bytes <= limit
    one_more = plan_streaming(mem, resident=sp.resident_layers + 1)
    assert one_more.device_bytes > limit  # the resident count is the largest that fits
    assert sp.device_bytes == mem.total_bytes - (sp.streamed_layers - sp.slots) * sp.layer_bytes
    assert sp.host_total_bytes == sp.streamed_layers * sp.layer_bytes + mem.host_bytes
    assert not sp.host_short  # 64 GiB assumed


def test_short_host_ram_warns_and_the_trainer_check_refuses():
    mem = plan_memory(_inputs(offload_activations=True))
    sp = plan_streaming(mem, host_ram_gib=16)
    assert sp.host_short and "host RAM" in sp.notes[0]
    assert host_ram_check(sp.host_total_bytes, int(sp.host_total_bytes / HOST_USABLE_FRACTION) + 1) is None
    assert "pinned host memory" in host_ram_check(sp.host_total_bytes, sp.host_total_bytes)


def test_a_model_too_large_even_for_streaming_says_so():
    tiny_card = plan_memory(_inputs("llama-3-70b", "qlora", gpu="l4", seq_len=16384, micro_batch=8))
    assert plan_streaming(tiny_card).verdict == "does not fit even with streaming"


def test_each_pass_costs_the_slower_of_its_compute_and_its_copies():
    p = _inputs()
    sp = plan_streaming(plan_memory(p))
    base = 1000.0
    assert streamed_tokens_per_s(base, p, sp) <= base
    step_s = p.seq_len * p.micro_batch / base
    forward_s, copied = step_s / 4, sp.streamed_layers - sp.slots

    def with_copy(copy_s):
        return streamed_tokens_per_s(base, p, sp.__class__(**{**sp.__dict__, "copy_s_per_layer": copy_s}))

    assert with_copy(0.0) == base
    assert with_copy(forward_s / copied) == pytest.approx(base)  # the forward's copies just hide behind its compute
    assert with_copy(2 * forward_s / copied) == pytest.approx(p.seq_len / (step_s + forward_s))  # forward copy-bound
    slow = 1.0  # both passes copy-bound: each takes its copies' time
    expected = (copied * slow - forward_s) + (copied * slow - 3 * forward_s)
    assert with_copy(slow) == pytest.approx(p.seq_len * p.micro_batch / (step_s + expected))


def test_plan_proposes_streaming_only_when_it_does_not_fit_and_not_when_switched_off():
    from onecard.plan.suggest import suggest_fixes

    mem = plan_memory(_inputs())
    fixes = suggest_fixes(mem)
    stream = [s for s in fixes if s.set == {"training.offload_weights": True}]
    assert stream and stream[0].verdict == "fits with streaming"
    off = plan_memory(_inputs(offload_weights=False))
    assert not [s for s in suggest_fixes(off) if "training.offload_weights" in s.set]
    assert streaming_section(plan_memory(_inputs(gpu="h200"))) is None  # fits: auto streams nothing, output as before
    assert streaming_section(mem)["verdict"] == "fits with streaming"


def test_onecard_plan_json_shows_streaming_for_the_70b_example_on_a_4090():
    from typer.testing import CliRunner

    from onecard.cli import app

    res = CliRunner().invoke(app, ["plan", "examples/llama3-70b-qlora.yaml", "--gpu", "rtx4090", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)
    s = payload["streaming"]
    assert s["verdict"] == "fits with streaming" and s["label"] == "estimated"
    assert payload["memory"]["verdict"] == "does not fit"  # the plan without streaming, as before
    assert s["device_bytes"] < payload["memory"]["capacity_bytes"] < payload["memory"]["total_bytes"]
    assert s["host_total_gib"] > 20 and s["host_ram_assumed"]


def test_streaming_planner_imports_no_torch():
    from _no_torch import assert_runs_without_torch

    assert_runs_without_torch("import onecard.plan.streaming, onecard.plan.suggest")
