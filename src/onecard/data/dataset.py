"""``build_dataset``: recipe + tokenizer -> tokenized, masked, truncated (and maybe packed) examples.

Reads top to bottom: find the split's file -> prepare it into the cache (or find it there) -> open its rows
memory-mapped. Preparation (:mod:`onecard.data.prepare`) reads and validates every record, tokenises and
masks them in ``datasets.map`` worker processes, drops and packs; a second launch with the same file,
tokenizer, chat template and data fields only hashes the file and opens the cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from onecard.data.prepare import prepare, split_path, split_records
from onecard.data.records import Record
from onecard.data.sources import read_source_records, resolve
from onecard.data.stats import SHOWN_WHERE

Example = dict[str, list[int]]


@dataclass
class DataStats:
    """Counts reported to the user. ``trained_tokens`` = label positions that enter the loss
    (labels[1:] != -100, the causal shift), i.e. the denominator of the token-mean loss."""

    records: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated_at: list[str] = field(default_factory=list)  # "file:line" of each truncated record
    dropped_at: list[str] = field(default_factory=list)    # "file:line" of each dropped record

    # Only the first SHOWN_WHERE places of each kind are kept: a summary, not a data dump.
    def note_truncated(self, where: str) -> None:
        self.truncated += 1
        if len(self.truncated_at) < SHOWN_WHERE:
            self.truncated_at.append(where)

    def note_dropped(self, where: str) -> None:
        self.dropped += 1
        if len(self.dropped_at) < SHOWN_WHERE:
            self.dropped_at.append(where)

    def as_dict(self) -> dict:
        return asdict(self)



@dataclass
class TokenizedDataset:
    """``examples``: rows indexable by int (a dict of lists) or slice; memory-mapped when built from the cache.
    ``summary``: the statistics of :func:`onecard.data.stats.summarize`; ``entry``: the cache directory."""

    examples: Sequence[Example] = field(default_factory=list)
    stats: DataStats = field(default_factory=DataStats)
    format: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    entry: Path | None = None
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def build_dataset(recipe, tokenizer, split: str = "train", *, progress: bool | None = None,
                  num_proc: int | None = None, rebuild: bool = False) -> TokenizedDataset:
    """Tokenized examples of ``split`` ("train" or "eval"); an eval split that is not configured is empty.

    ``progress``: bars and the cache line on stderr (None = when preparing more than a few thousand records or
    reading the cache of such a split); ``num_proc``: tokenising workers (None = the cores).
    """
    from onecard.data.progress import Phases
    from onecard.data.stats import trainer_stats
    from onecard.data.store import open_rows

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if recipe.task in ("dpo", "kto"):
        raise ValueError("build_dataset handles sft/pretrain; preference tasks have their own builder")
    started = time.perf_counter()
    with Phases(enabled=_show_progress(recipe, split, progress)) as phases:
        prepared = prepare(recipe, tokenizer, split, phases, num_proc=num_proc, rebuild=rebuild)
        if prepared is None:
            return TokenizedDataset()
        rows = open_rows(prepared.entry, prepared.meta)
        summary = prepared.meta["summary"]
        how = "from the cache, not re-tokenised" if prepared.from_cache else "tokenised and cached"
        phases.say(f"data: {summary['records']:,} {split} records -> {len(rows):,} rows, {how} "
                   f"({time.perf_counter() - started:.1f} s): {prepared.entry}")
    return TokenizedDataset(rows, DataStats(**trainer_stats(summary)), prepared.meta["format"], summary,
                            prepared.entry, prepared.from_cache)


def _show_progress(recipe, split: str, progress: bool | None) -> bool:
    if progress is not None:
        return progress
    path = split_path(recipe, split)
    try:
        return bool(path) and Path(path).stat().st_size > 4 << 20  # small files prepare in well under a second
    except OSError:
        return False


def select_records(recipe, split: str) -> list[Record]:
    """The records of a split in memory (evaluation prompts, preference data), with ``data.columns``/``data.roles``
    applied: ``data.eval_path`` if given,
    else a seeded ``data.eval_fraction`` of ``data.path`` -- the same records :func:`build_dataset` uses."""
    path = split_path(recipe, split)
    if path is None:
        return []
    records = read_source_records(resolve(path, recipe.data), recipe.data.columns, recipe.data.roles)
    chosen = split_records(recipe, split, len(records))
    return records if chosen is None else [records[i] for i in chosen]
