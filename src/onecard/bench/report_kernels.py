"""The 'Kernels: targets' section of docs/benchmarks.md, from the bench rows with ``group: kernels``.

Those rows come from ``onecard bench --suite src/onecard/bench/suite.yaml --part K`` (bench/results/h200-k*.jsonl).
A configuration can be measured again by a later run; the section shows the latest row of each configuration (by
``date``) and lists the earlier ones in one line (they stay in the raw files). Every verdict is computed here from
the rows against the kernel targets' thresholds; the only hand-written figures are the targets' own Unsloth numbers, labelled so.
"""

from __future__ import annotations

from typing import Any, Callable

from onecard.bench.report_md import fmt, table

KEY_FIELDS = ("label", "model", "method", "rank", "seq", "micro_batch", "grad_ckpt", "kernels",
              "offload_activations", "memory_cap_gib")
SPEEDUP_VS_PLAIN = 2.0  # target 1 (and Mistral, target 4): tokens/s >= 2.0x plain transformers + peft
MEMORY_VS_PLAIN = 0.4  # target 1: peak reserved <= 0.4x plain
CAP_TOKENS_PER_S = 11_500  # target 2: under --memory-cap-gib 24, on the H200
CAP_VS_BEST_PLAIN = 2.2  # target 2: >= 2.2x the best plain setting that fits the cap
QWEN_VS_PLAIN = 1.9  # target 4
QLORA_VS_LORA = 0.95  # target 4: onecard QLoRA >= 0.95x onecard LoRA ...
QLORA_PEAK_GIB = 11.0  # ... at <= 11 GiB
DORA_VS_LORA = 0.85  # the kernel target: DoRA >= 0.85x onecard's LoRA
TARGET_ORDER = ["1", "2", "4 (Mistral)", "4 (Qwen)", "4 (QLoRA)", "DoRA"]
# The targets' own Unsloth numbers (Unsloth 2026.10.9, H200, not measured by onecard): set beside ours only.
ISSUE_REFERENCE = [
    "target 1: Unsloth 11,227 tokens/s (1.72x plain) at 20.0 GiB (plain 6,517 tokens/s at 50.5 GiB)",
    "target 2: Unsloth 11,233 tokens/s at micro-batch 8 under a 24 GB cap (plain fits micro-batch 1: 5,201)",
    "target 4: Mistral 7B Unsloth 11,487 tokens/s (1.73x plain 6,642); Qwen 2.5 7B Unsloth 11,530 (1.64x plain "
    "7,017); Unsloth QLoRA Llama 3 8B 11,055 tokens/s at 10.6 GiB",
]


def _is(rec: dict[str, Any], **kw: Any) -> bool:
    return all(rec.get(k) == v for k, v in kw.items())


def _onecard(rec: dict[str, Any]) -> bool:
    """Asked for onecard's kernels (what the configuration is); a fallback shows in :func:`_config`."""
    return (rec.get("kernels") or "none") != "none"


def _ok(rec: dict[str, Any], prefix: str = "") -> bool:
    return rec.get(f"{prefix}status") == "ok" and bool(rec.get(f"{prefix}tokens_per_s"))



def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def config_key(rec: dict[str, Any]) -> tuple:
    return tuple(rec.get(k) for k in KEY_FIELDS)


def latest_and_earlier(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The latest row of each configuration (by ``date``; a tie goes to the later in file order), in first-seen
    order, and the rows they supersede. A row measuring code onecard no longer runs (bench/calibrate.py
    ``superseded``, e.g. a reverted experiment) is never the latest: it stays among the earlier ones."""
    from onecard.bench.calibrate import superseded

    rows = [r for r in records if r.get("group") == "kernels" and r.get("device") == "cuda"]
    latest: dict[tuple, dict[str, Any]] = {}
    for rec in rows:
        if superseded(rec):
            continue
        key = config_key(rec)
        if key not in latest or rec["date"] >= latest[key]["date"]:
            latest[key] = rec
    chosen = {id(r) for r in latest.values()}
    return list(latest.values()), [r for r in rows if id(r) not in chosen]


def _partner(rec: dict[str, Any], rows: list[dict[str, Any]], match: Callable[[dict[str, Any]], bool],
             best: Callable[[dict[str, Any]], Any] = lambda r: r["date"]) -> dict[str, Any] | None:
    """The reference row for ``rec``: from the same run (file) when there is one, else from any run (the caller
    names the file); ``best`` picks among candidates (default: the latest)."""
    cands = [r for r in rows if r is not rec and match(r)]
    same = [r for r in cands if r.get("_file") == rec.get("_file")]
    return max(same or cands, key=best) if (same or cands) else None


def _where(rec: dict[str, Any], ref: dict[str, Any]) -> str:
    return "same run" if ref.get("_file") == rec.get("_file") else f"another run: {ref.get('_file')}"


def _plain_baseline(rec, rows):
    """The in-process plain transformers + peft half for ``rec``: its own, or (a row run without --baseline, e.g.
    offloaded) that of the same model/method/shape row with one, uncapped."""
    if _ok(rec, "baseline_"):
        return rec, "own in-process baseline"
    ref = _partner(rec, rows, lambda r: _ok(r, "baseline_") and r.get("memory_cap_gib") is None and _is(
        r, **{k: rec[k] for k in ("model", "method", "rank", "seq", "micro_batch")}))
    return (ref, f"baseline of the `{ref['label']}` row ({_where(rec, ref)})") if ref else (None, "")


def _vs_plain(rec, rows, min_speedup: float, max_memory: float | None, what: str) -> dict[str, Any]:
    base, note = _plain_baseline(rec, rows)
    x = _ratio(rec.get("tokens_per_s"), base and base.get("baseline_tokens_per_s"))
    xm = _ratio(rec.get("peak_reserved_gib"), base and base.get("baseline_peak_reserved_gib"))
    target = f">= {min_speedup}x plain tokens/s" + (f", <= {max_memory}x plain peak" if max_memory else "")
    met = _ok(rec) and x is not None and x >= min_speedup and (max_memory is None or (xm or 1e9) <= max_memory)
    measured = "no plain baseline" if x is None else f"{x:.2f}x tokens/s, {fmt(xm, '.3f')}x peak (plain: {note})"
    return {"target_id": what, "target": target, "x_plain": x, "x_plain_memory": xm, "measured": measured,
            "met": met}


def _under_cap(rec, rows) -> dict[str, Any]:
    ref = _partner(rec, rows, lambda r: not _onecard(r) and _ok(r) and _is(
        r, **{k: rec[k] for k in ("model", "method", "rank", "seq", "memory_cap_gib")}),
        best=lambda r: r["tokens_per_s"])
    x = _ratio(rec.get("tokens_per_s"), ref and ref["tokens_per_s"])
    xm = _ratio(rec.get("peak_reserved_gib"), ref and ref.get("peak_reserved_gib"))
    met = _ok(rec) and rec["tokens_per_s"] >= CAP_TOKENS_PER_S and x is not None and x >= CAP_VS_BEST_PLAIN
    measured = ("no plain row under the cap" if ref is None else
                f"{rec.get('tokens_per_s') or 0:,.0f} tokens/s, {x:.2f}x the best plain setting under the cap "
                f"(`{ref['label']}`, {_where(rec, ref)})")
    return {"target_id": "2", "target": f">= {CAP_TOKENS_PER_S:,} tokens/s and >= {CAP_VS_BEST_PLAIN}x the best "
            f"plain setting under the {rec['memory_cap_gib']} GiB cap", "x_plain": x, "x_plain_memory": xm,
            "measured": measured, "met": met}


def _vs_lora(rec, rows, min_ratio: float, max_peak_gib: float | None, what: str) -> dict[str, Any]:
    """onecard's QLoRA / DoRA against onecard's LoRA with the same checkpointing (full vs full, offloaded vs
    offloaded), same shape, uncapped."""
    same = ("model", "rank", "seq", "micro_batch", "grad_ckpt", "offload_activations", "memory_cap_gib")
    ref = _partner(rec, rows, lambda r: _onecard(r) and _ok(r) and r["method"] == "lora" and _is(
        r, **{k: rec.get(k) for k in same}))
    x = _ratio(rec.get("tokens_per_s"), ref and ref["tokens_per_s"])
    peak = rec.get("peak_reserved_gib")
    met = _ok(rec) and x is not None and x >= min_ratio and (max_peak_gib is None or (peak or 1e9) <= max_peak_gib)
    base, _ = _plain_baseline(rec, rows)
    target = f">= {min_ratio}x onecard LoRA tokens/s" + (f", <= {max_peak_gib:g} GiB" if max_peak_gib else "")
    measured = ("no onecard LoRA row to compare" if ref is None else
                f"{x:.3f}x onecard LoRA (`{ref['label']}`, {_where(rec, ref)}), {fmt(peak, '.2f')} GiB")
    return {"target_id": what, "target": target,
            "x_plain": _ratio(rec.get("tokens_per_s"), base and base.get("baseline_tokens_per_s")),
            "x_plain_memory": _ratio(peak, base and base.get("baseline_peak_reserved_gib")),
            "measured": measured, "met": met}


def _judge(rec, rows) -> dict[str, Any] | None:
    """Which kernel target a onecard row answers, and the verdict (None: no target for it)."""
    if not (_onecard(rec) and _is(rec, seq=2048, rank=16, micro_batch=8, grad_ckpt=True)):
        return None
    cap, model, method = rec.get("memory_cap_gib"), rec["model"], rec["method"]
    if cap is not None:
        return _under_cap(rec, rows) if (model, method, cap) == ("llama-3-8b", "lora", 24) else None
    judges = {("llama-3-8b", "lora"): lambda: _vs_plain(rec, rows, SPEEDUP_VS_PLAIN, MEMORY_VS_PLAIN, "1"),
             ("mistral-7b", "lora"): lambda: _vs_plain(rec, rows, SPEEDUP_VS_PLAIN, None, "4 (Mistral)"),
             ("qwen2.5-7b", "lora"): lambda: _vs_plain(rec, rows, QWEN_VS_PLAIN, None, "4 (Qwen)"),
             ("llama-3-8b", "qlora"): lambda: _vs_lora(rec, rows, QLORA_VS_LORA, QLORA_PEAK_GIB, "4 (QLoRA)"),
             ("llama-3-8b", "dora"): lambda: _vs_lora(rec, rows, DORA_VS_LORA, None, "DoRA")}
    judge = judges.get((model, method))
    return judge() if judge else None


def _config(rec: dict[str, Any], plain: bool = False) -> str:
    cap = f", cap {rec['memory_cap_gib']} GiB" if rec.get("memory_cap_gib") is not None else ""
    if plain:
        return f"{rec['model']} {rec['method']} r{rec['rank']} seq{rec['seq']} b{rec['micro_batch']} ckpt, " \
               f"transformers + peft (baseline half){cap}"
    applied = rec.get("kernels_applied") or "none"
    fell_back = f" (kernels applied: {applied})" if applied != (rec.get("kernels") or "none") else ""
    return f"{rec['label']}{cap}{fell_back}"


def _entry(rec: dict[str, Any], prefix: str, verdict: dict[str, Any] | None) -> dict[str, Any]:
    plain = bool(prefix) or not _onecard(rec)
    v = verdict or {}
    return {"configuration": _config(rec, bool(prefix)), "path": "transformers + peft" if plain else "onecard",
            "model": rec["model"], "method": rec["method"], "micro_batch": rec["micro_batch"],
            "offload_activations": bool(rec.get("offload_activations")) and not prefix,
            "memory_cap_gib": rec.get("memory_cap_gib"), "status": rec.get(f"{prefix}status"),
            "tokens_per_s": rec.get(f"{prefix}tokens_per_s") if _ok(rec, prefix) else None,
            "peak_reserved_gib": rec.get(f"{prefix}peak_reserved_gib"), "x_plain": v.get("x_plain"),
            "x_plain_memory": v.get("x_plain_memory"), "target_id": v.get("target_id"),
            "target": v.get("target") or ("reference (plain)" if plain else "-"), "measured": v.get("measured"),
            "met": v.get("met"), "date": rec["date"], "file": rec.get("_file"),
            "command": rec["config_command"] + ("  (baseline half)" if prefix else "")}


def _targets(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One verdict per target: met when any of its rows is (any checkpointing strategy counts)."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e["target_id"]:
            t = out.setdefault(e["target_id"], {"target_id": e["target_id"], "target": e["target"], "met": False,
                                                "rows": [], "met_by": []})
            t["met"] = t["met"] or bool(e["met"])
            t["rows"].append(e["configuration"])
            t["met_by"] += [e["configuration"]] if e["met"] else []
    return sorted(out.values(), key=lambda t: TARGET_ORDER.index(t["target_id"]))


def kernels_section(records: list[dict[str, Any]], probes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The latest row per configuration with its verdict, the target summary and the earlier runs (JSON-ready;
    rendered by :func:`render_kernels`); ``probes``: saved ``onecard plan --probe`` results (target 3)."""
    latest, earlier = latest_and_earlier(records)
    rows = latest + earlier
    entries = []
    for rec in latest:
        entries.append(_entry(rec, "", _judge(rec, rows)))
        if rec.get("baseline"):
            entries.append(_entry(rec, "baseline_", None))
    versions = []
    for rec in latest:
        if rec.get("versions") not in versions:
            versions.append(rec.get("versions"))
    return {"rows": entries, "targets": _targets(entries), "versions": versions,
            "files": sorted({r.get("_file") for r in latest}), "dates": sorted({r["date"] for r in latest}),
            "earlier": [_entry(r, "", None) | {"baseline_tokens_per_s": r.get("baseline_tokens_per_s"),
                                                "baseline": bool(r.get("baseline"))} for r in earlier],
            "issue_reference": ISSUE_REFERENCE, "probes": probes or []}



def _verdict(met: bool | None) -> str:
    return "-" if met is None else ("**met**" if met else "not met")


def render_kernels(section: dict[str, Any]) -> str:
    if not section["rows"]:
        return ""
    versions = "; ".join(", ".join(f"{k} {v}" for k, v in (vs or {}).items() if v is not None)
                         for vs in section["versions"])
    dates = [d[:16].replace("T", " ") for d in section["dates"]]
    out = [f"""
## Kernels: targets - measured, H200

The `group: kernels` rows of {", ".join(f"`bench/results/{f}`" for f in section["files"])}
(`onecard bench --suite src/onecard/bench/suite.yaml --part K`), measured {dates[0]} to {dates[-1]} UTC
({versions}).
Each configuration shows its latest row by date (the *run* column: file and UTC time), leaving out rows of code
onecard no longer runs (bench/calibrate.py `superseded`); earlier runs of the same configurations stay in the raw
files (listed below the table). *x plain* is tokens/s (and peak reserved) over plain transformers + peft measured in the
same process (`--baseline`); a row run without `--baseline` (the offloaded ones) is set against the baseline of the
same model and shape row that has one, from the same run (the *measured* column names it). Under the 24 GiB cap,
*x plain* is over the best plain transformers + peft setting that fits the cap in the same run (status ok under
`--memory-cap-gib` means the step fit the cap). Verdicts are computed
from the rows by `onecard/bench/report_kernels.py`.
"""]
    out.append(table(["configuration", "run", "tokens/s", "x plain", "peak reserved GiB", "x plain memory", "target",
                       "measured", "result", "command"],
                      [[e["configuration"], f"{e['file']} {e['date'][11:16]}", fmt(e["tokens_per_s"], ",.0f"),
                        fmt(e["x_plain"], ".2f"),
                        fmt(e["peak_reserved_gib"], ".2f"), fmt(e["x_plain_memory"], ".3f"),
                        (f"{e['target_id']}: " if e["target_id"] else "") + e["target"], e["measured"] or "-",
                        _verdict(e["met"]) if e["status"] == "ok" else f"not met ({e['status']})"
                        if e["target_id"] else e["status"] or "-", f"`{e['command']}`"] for e in section["rows"]]))
    out.append("\nTargets (met when any checkpointing variant meets it):\n")
    out += [f"- {t['target_id']}: {t['target']}: {_verdict(t['met'])}"
            + (f" (by {', '.join(t['met_by'])})" if t["met_by"] else "") for t in section["targets"]]
    out.append(_probe_line(section.get("probes") or []))
    out.append("For reference, the issue's numbers (Unsloth 2026.10.9 as measured in the issue, not by onecard): "
               + "; ".join(section["issue_reference"]) + ".\n")
    out.append(_earlier(section))
    return "\n".join(out)


def _checkpointing(tried: dict[str, Any]) -> str:
    if not tried["grad_ckpt"]:
        return "no ckpt"
    return "ckpt+offload" if tried.get("offload_activations") else "ckpt"


def _probe_line(probes: list[dict[str, Any]]) -> str:
    """Target 3 is a different measurement: what ``onecard plan --probe`` measured and picked (not judged here)."""
    head = "- 3 (`onecard plan --probe` picks the fastest setting for a card with room): "
    if not probes:
        return head + "not measured.\n"
    parts = []
    for p in probes:
        best, tried = p["best"], p.get("tried", [])
        rates = ", ".join(f"b{t['micro_batch']} {_checkpointing(t)} {t['kernels']} {fmt(t.get('tokens_per_s'), ',.0f')}"
                          for t in tried)
        when = f" ({p['date'][:10]} {p['date'][11:16]} UTC)" if p.get("date") else ""
        parts.append(f"`bench/results/{p['_file']}`{when} measured {rates} tokens/s (cap {p['cap_gib']:.1f} GiB, seq "
                     f"{p['seq']}) and picked `{' '.join(p['set'])}`: {fmt(best.get('tokens_per_s'), ',.0f')} tokens/s "
                     f"at {fmt(best.get('peak_reserved_gib'), '.1f')} GiB")
    return head + "; ".join(parts) + " (recorded, not judged by this table).\n"


def _earlier(section: dict[str, Any]) -> str:
    """One line; a command is written out only where the table above does not already show it."""
    if not section["earlier"]:
        return "Earlier runs of these configurations: none yet.\n"
    shown = {e["command"] for e in section["rows"]}
    parts = []
    for e in section["earlier"]:
        cmds = [e["command"]] + ([e["command"] + "  (baseline half)"] if e["baseline"] else [])
        extra = "".join(f" `{c}`" for c in cmds if c not in shown)
        plain = f", plain {fmt(e['baseline_tokens_per_s'], ',.0f')}" if e["baseline"] else ""
        parts.append(f"{e['configuration']}, {e['date']} ({e['file']}): {fmt(e['tokens_per_s'], ',.0f')} tokens/s"
                     f"{plain}, {fmt(e['peak_reserved_gib'], '.2f')} GiB{extra}")
    return ("Earlier runs of these configurations (superseded by the rows above, kept in the raw files; same command "
            "unless written out): " + "; ".join(parts) + ".\n")
