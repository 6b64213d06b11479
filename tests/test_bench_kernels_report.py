"""The 'Kernels: targets' section: latest row per configuration, verdicts computed from the rows."""

from __future__ import annotations

import json
from pathlib import Path

from onecard.bench.calibrate import load_records
from onecard.bench.report import kernel_probes
from onecard.bench.report_kernels import kernels_section, latest_and_earlier, render_kernels

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _row(file: str, date: str, *, model="llama-3-8b", method="lora", batch=8, kernels="onecard", offload=False,
         cap=None, tps=12_000.0, peak=20.0, base_tps=None, base_peak=None, steps=4, status="ok"):
    label = f"{model} {method} r16 seq2048 b{batch} {'ckpt+offload' if offload else 'ckpt'} {kernels}"
    cmd = (f"onecard bench --model {model} --method {method} --seq 2048 --batch {batch} --rank 16 --grad-ckpt "
           f"--kernels {kernels} --steps {steps}" + (" --baseline" if base_tps else "")
           + (" --offload-activations" if offload else "") + (f" --memory-cap-gib {cap}" if cap else "") + " --json")
    rec = {"model": model, "method": method, "seq": 2048, "micro_batch": batch, "rank": 16, "grad_ckpt": True,
           "kernels": kernels, "kernels_applied": kernels, "offload_activations": offload, "memory_cap_gib": cap,
           "group": "kernels", "device": "cuda", "label": label, "date": date, "_file": file, "status": status,
           "tokens_per_s": tps, "peak_reserved_gib": peak, "config_command": cmd, "baseline": bool(base_tps),
           "kbit_upcast": False, "versions": {"torch": "2.11.0", "gpu": "NVIDIA H200"}}
    if base_tps:
        rec.update(baseline_status="ok", baseline_tokens_per_s=base_tps, baseline_peak_reserved_gib=base_peak)
    return rec


def _by_config(section):
    return {e["configuration"]: e for e in section["rows"]}


def test_met_and_not_met_verdicts_are_computed_from_the_rows():
    recs = [_row("k.jsonl", "2026-12-01T10:00", tps=13_000, peak=18.0, base_tps=6_000, base_peak=50.0),  # 2.17x, 0.36x
            _row("k.jsonl", "2026-12-01T10:01", offload=True, tps=11_000, peak=15.0),  # 1.83x: speed misses
            _row("k.jsonl", "2026-12-01T10:02", model="mistral-7b", tps=9_000, peak=20.0, base_tps=6_000,
                 base_peak=30.0),  # 1.5x < 2.0x
            _row("k.jsonl", "2026-12-01T10:03", offload=True, cap=24, tps=11_600, peak=21.0),
            _row("k.jsonl", "2026-12-01T10:04", batch=1, kernels="none", cap=24, tps=5_000, peak=20.0),  # 2.32x
            _row("k.jsonl", "2026-12-01T10:05", method="qlora", tps=12_600, peak=14.0),  # 0.97x LoRA, 14 GiB > 11
            _row("k.jsonl", "2026-12-01T10:06", method="qlora", offload=True, tps=10_000, peak=10.0)]  # 0.91x
    s = kernels_section(recs)
    rows = _by_config(s)
    plain_b8 = rows["llama-3-8b lora r16 seq2048 b8 ckpt onecard"]
    assert plain_b8["met"] is True and abs(plain_b8["x_plain"] - 13_000 / 6_000) < 1e-9
    offload = rows["llama-3-8b lora r16 seq2048 b8 ckpt+offload onecard"]
    assert offload["met"] is False and abs(offload["x_plain_memory"] - 15.0 / 50.0) < 1e-9  # the b8 row's baseline
    assert rows["mistral-7b lora r16 seq2048 b8 ckpt onecard"]["met"] is False
    assert rows["llama-3-8b lora r16 seq2048 b8 ckpt+offload onecard, cap 24 GiB"]["met"] is True
    # QLoRA against LoRA with the same checkpointing: full-ckpt misses on memory, offloaded on speed (11,000 ref)
    assert rows["llama-3-8b qlora r16 seq2048 b8 ckpt onecard"]["met"] is False
    qo = rows["llama-3-8b qlora r16 seq2048 b8 ckpt+offload onecard"]
    assert qo["met"] is False and "0.909x" in qo["measured"]
    verdicts = {t["target_id"]: t["met"] for t in s["targets"]}
    assert verdicts == {"1": True, "2": True, "4 (Mistral)": False, "4 (QLoRA)": False}
    md = render_kernels(s)
    assert "**met**" in md and "not met" in md and "Unsloth 2026.10.9 as measured in the issue" in md


def test_cap_target_needs_both_the_floor_and_the_ratio():
    recs = [_row("k.jsonl", "2026-12-01T10:03", offload=True, cap=24, tps=11_400, peak=21.0),  # below 11,500
            _row("k.jsonl", "2026-12-01T10:04", batch=1, kernels="none", cap=24, tps=4_000, peak=20.0),
            _row("k.jsonl", "2026-12-01T10:05", batch=2, kernels="none", cap=24, tps=5_500, peak=23.0)]
    (row,) = [e for e in kernels_section(recs)["rows"] if e["target_id"] == "2"]
    assert row["met"] is False and abs(row["x_plain"] - 11_400 / 5_500) < 1e-9  # the best plain setting, not b1


def test_the_latest_row_of_a_configuration_is_shown_and_earlier_ones_listed():
    old = _row("k2.jsonl", "2026-12-01T09:00", tps=10_000, base_tps=6_000, base_peak=50.0, steps=3)
    new = _row("k.jsonl", "2026-12-02T09:00", tps=12_500, base_tps=6_100, base_peak=50.0)  # earlier file, later date
    off_new = _row("k.jsonl", "2026-12-02T09:01", offload=True, tps=12_300, peak=19.0)
    s = kernels_section([new, off_new, old])
    shown = [e for e in s["rows"] if e["configuration"] == "llama-3-8b lora r16 seq2048 b8 ckpt onecard"]
    assert [e["tokens_per_s"] for e in shown] == [12_500]
    assert [(e["date"], e["tokens_per_s"]) for e in s["earlier"]] == [("2026-12-01T09:00", 10_000)]
    offload = _by_config(s)["llama-3-8b lora r16 seq2048 b8 ckpt+offload onecard"]
    assert abs(offload["x_plain"] - 12_300 / 6_100) < 1e-9  # the baseline of the same run, not the older one
    md = render_kernels(s)
    assert old["config_command"] in md and old["config_command"] + "  (baseline half)" in md  # differs: written out
    assert "kept in the raw files" in md


def test_docs_kernels_section_matches_the_raw_results():
    doc = json.loads((DOCS / "benchmarks.json").read_text())
    fresh = json.loads(json.dumps(kernels_section(load_records(), probes=kernel_probes()), default=str))
    assert doc["kernels"] == fresh, "regenerate with `python -m onecard.bench.report`"
    assert render_kernels(fresh) in (DOCS / "benchmarks.md").read_text()


def test_a_row_of_reverted_code_is_never_the_latest():
    """A row inside bench/calibrate.py's CE_CHUNK_EXPERIMENT window (code onecard no longer runs) stays among the
    earlier rows even though it is the newest of its configuration."""
    from onecard.bench.calibrate import CE_CHUNK_EXPERIMENT

    # not offloaded: offloaded rows of that time are superseded anyway (calibrate.SPLIT_OFFLOAD_SINCE)
    kept = _row("k6.jsonl", "2026-11-28T18:53", tps=13_000, peak=22.7)
    reverted = _row("k7.jsonl", CE_CHUNK_EXPERIMENT[0][:11] + "18:58", tps=13_100, peak=23.3)
    latest, earlier = latest_and_earlier([kept, reverted])
    assert latest == [kept] and earlier == [reverted]


def test_target_3_shows_what_the_probe_measured_and_picked():
    probe = {"_file": "e2e/probe_x.json", "seq": 2048, "cap_gib": 140.4, "set": ["training.micro_batch_size=8"],
             "best": {"tokens_per_s": 13_681.4, "peak_reserved_gib": 101.35},
             "tried": [{"micro_batch": 4, "grad_ckpt": False, "kernels": "onecard", "tokens_per_s": 13_627.9},
                       {"micro_batch": 8, "grad_ckpt": False, "kernels": "onecard", "tokens_per_s": 13_681.4}]}
    rows = [_row("k.jsonl", "2026-12-01T10:00", tps=13_000, peak=20.0, base_tps=6_500, base_peak=50.0)]
    text = render_kernels(kernels_section(rows, probes=[probe]))
    line = next(x for x in text.splitlines() if x.startswith("- 3 "))
    assert "e2e/probe_x.json" in line and "b4 no ckpt onecard 13,628" in line
    assert "`training.micro_batch_size=8`: 13,681 tokens/s at 101.3 GiB" in line
    assert "not measured" in next(x for x in render_kernels(kernels_section(rows)).splitlines() if x.startswith("- 3 "))
