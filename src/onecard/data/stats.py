"""What the user should know about prepared data before training: lengths, losses to truncation and dropping,
the share of tokens that are trained, and how full packed rows are. Pure numpy over per-example counts."""

from __future__ import annotations

from typing import Any

HISTOGRAM_BINS = 12


SHOWN_WHERE = 20  # truncated / dropped records named by file:line (a summary, not a data dump)


def summarize(n_tokens, kept_lengths, trained, seq_len: int, packing: bool, dropped: int, rows) -> dict[str, Any]:
    """``n_tokens``: each record's length before truncation; ``kept_lengths``/``trained``: tokens and trained
    tokens of each kept example (or pre-training block); ``rows``: row lengths under greedy packing."""
    import numpy as np

    n_tokens = np.asarray(n_tokens, dtype=np.int64)
    tokens, trained_tokens = int(np.sum(kept_lengths)), int(np.sum(trained))
    top = max(int(n_tokens.max(initial=0)), 1)
    counts, edges = np.histogram(n_tokens, bins=HISTOGRAM_BINS, range=(0, top))
    n_rows = len(rows)
    return {
        "records": int(len(n_tokens)), "examples": int(len(kept_lengths)),
        "truncated": int((n_tokens > seq_len).sum()), "dropped": dropped, "seq_len": seq_len,
        "tokens": tokens, "trained_tokens": trained_tokens,
        "trained_fraction": trained_tokens / tokens if tokens else 0.0,
        "mean_tokens_per_example": tokens / len(kept_lengths) if len(kept_lengths) else 0.0,
        "length_percentiles": {f"p{q}": int(np.percentile(n_tokens, q)) if len(n_tokens) else 0 for q in (50, 90, 99, 100)},
        "histogram": {"edges": [int(e) for e in edges], "counts": [int(c) for c in counts]},
        "packing": {"enabled": packing, "rows": n_rows,
                    "efficiency": tokens / (n_rows * seq_len) if n_rows else 0.0},
    }


def trainer_stats(summary: dict[str, Any]) -> dict[str, int]:
    """The counts :class:`onecard.data.DataStats` carries, and the first places of the truncated and dropped."""
    out = {k: summary[k] for k in ("records", "truncated", "dropped", "tokens", "trained_tokens")}
    return {**out, "truncated_at": summary.get("truncated_at", []), "dropped_at": summary.get("dropped_at", [])}


def render_stats(console, summary: dict[str, Any], width: int = 40) -> None:
    """The summary for a person: a table of counts and a text histogram of example lengths."""
    from rich.table import Table

    seq_len, packing = summary["seq_len"], summary["packing"]
    pct = summary["length_percentiles"]
    table = Table(show_header=False, box=None, pad_edge=False)
    rows = [
        ("records / examples kept", f"{summary['records']:,} / {summary['examples']:,}"),
        ("truncated (> seq_len)", f"{summary['truncated']:,} (seq_len {seq_len:,})"),
        ("dropped (nothing to train)", f"{summary['dropped']:,}"),
        ("tokens / trained tokens", f"{summary['tokens']:,} / {summary['trained_tokens']:,} "
                                    f"({summary['trained_fraction']:.1%} trained)"),
        ("mean tokens per example", f"{summary['mean_tokens_per_example']:,.1f}"),
        ("length p50 / p90 / p99 / max", " / ".join(f"{pct[k]:,}" for k in ("p50", "p90", "p99", "p100"))),
        ("packing efficiency", f"{packing['efficiency']:.1%} ({packing['rows']:,} rows of {seq_len:,})"
                               + ("" if packing["enabled"] else " with data.packing: true")),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    edges, counts = summary["histogram"]["edges"], summary["histogram"]["counts"]
    top = max(counts) or 1
    console.print("token length (before truncation)   examples")
    for lo, hi, n in zip(edges, edges[1:], counts):
        mark = " <- seq_len" if lo < seq_len <= hi else ""
        console.print(f"  {lo:>7,}-{hi:<7,} {'#' * round(width * n / top):<{width}} {n:>8,}{mark}")
