"""Lint's look at the data: each file exists, reads, and holds one format that fits the task; with a tokenizer,
how long its examples are (counts, mean and p95 tokens, the lines cut at data.seq_len).

Records are streamed (JSONL line by line) so a large file is checked in constant memory; JSON arrays, Parquet and
CSV go through the trainer's reader (onecard.data.records). Validation reuses the trainer's own functions
(detect_format, to_messages, tokenize_chat), so lint reports what training would hit, with the same messages.
Token statistics are cached (onecard.cache, keyed by the file, the model and the data settings) so that
``onecard plan`` can use them without a tokenizer. No torch or transformers import here: the caller brings the
tokenizer.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from onecard.data.formats import CONVERSATION_FORMATS
from onecard.data.records import SUPPORTED, Record, read_records
from onecard.data.sources import HUB_PREFIX, read_source_records, resolve
from onecard.errors import UserError

STREAMED = (".jsonl", ".ndjson")
STATS_FORMAT = 2        # part of the cache key: bump when DataStatsReport's fields change
LINES_SHOWN = 5         # truncated examples named by line, the rest counted


@dataclass
class DataStatsReport:
    path: str
    format: str
    records: int
    examples: int = 0                  # records that train (others dropped: no assistant turn)
    mean_tokens: float | None = None   # per example, before truncation
    mean_tokens_trained: float | None = None  # per example after truncation at data.seq_len (what a step sees)
    p95_tokens: int | None = None
    max_tokens: int | None = None
    truncated: int = 0
    truncated_lines: list[int] = field(default_factory=list)   # the first LINES_SHOWN (Parquet: rows)
    unit: str = "line"
    note: str = ""                     # what could not be measured, and why

    def to_dict(self) -> dict:
        return asdict(self)


def iter_records(path: str | Path, data=None) -> Iterator[Record]:
    """The source's records one at a time, with ``data.columns``/``data.roles`` of the recipe's ``data`` applied.
    Anything other than a non-empty JSONL file goes through the trainer's reader, which raises its own messages
    (not found, unknown type, empty; a directory or hub id is read through datasets)."""
    from onecard.data.mapping import remap

    spec, file = str(path), Path(path)
    if spec.startswith(HUB_PREFIX) or file.suffix.lower() not in STREAMED or not file.is_file() or file.stat().st_size == 0:
        yield from (read_records(file) if data is None else
                    read_source_records(resolve(spec, data), data.columns, data.roles))
        return
    for record in _iter_jsonl(file):
        yield remap(record, data.columns, data.roles) if data is not None else record


def _iter_jsonl(path: Path) -> Iterator[Record]:
    # Streamed here where read_records reads the whole file into memory; same checks, same messages.
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"line is not valid UTF-8 (byte {exc.start + 1} of the line)", where=f"{path}:{number}",
                                fix="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`)"
                                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"malformed JSON at column {exc.colno}: {exc.msg}", where=f"{path}:{number}",
                                fix="each line must be one complete JSON object; check quotes, commas and brackets "
                                    "on this line") from None
            if not isinstance(obj, dict):
                raise UserError(f"expected a JSON object, found {type(obj).__name__}", where=f"{path}:{number}",
                                fix='each example must be an object such as {"messages": [...]} or {"text": ...}')
            yield Record(obj, str(path), number)


def data_files(recipe) -> list[tuple[str, str]]:
    """``(recipe field, path)`` of every data file the recipe names."""
    pairs = (("data.path", recipe.data.path), ("data.eval_path", recipe.data.eval_path), ("eval.path", recipe.eval.path))
    return [(name, path) for name, path in pairs if path]


def scan_file(recipe, path: str, tokenizer=None) -> DataStatsReport:
    """Read every record of ``path`` as training would (UserError at the first bad one); with ``tokenizer``, also
    the token length of each example."""
    from onecard.data.formats import detect_format, record_format

    records = iter_records(path, recipe.data)
    first = next(records, None)
    if first is None:
        raise UserError("data file holds no records", where=str(path), fix="add examples, one JSON object per line")
    fmt = detect_format([first], recipe.data.format, recipe.task)
    counter = _TokenCounter(recipe, tokenizer, fmt) if tokenizer is not None else None
    report = DataStatsReport(path=str(path), format=fmt, records=0)
    for record in _chain(first, records):
        report.records += 1
        if fmt in ("dpo", "kto"):
            if record_format(record) != fmt:
                keys = ", ".join(sorted(record.data)) or "(none)"
                raise UserError(f"this record is not {fmt} data like the first one (its fields: {keys})",
                                where=record.where, fix=f"every record of a {fmt} file needs the same fields")
            continue
        messages = _validated(record, fmt)
        if counter is not None:
            counter.add(record, messages)
    if counter is not None:
        counter.finish(report)
    elif fmt in ("dpo", "kto"):
        report.note = f"token lengths of {fmt} pairs are not measured by lint"
    else:
        report.note = "token lengths not measured: no local tokenizer (model is a preset or a hub id)"
    return report


def _chain(first: Record, rest: Iterator[Record]) -> Iterator[Record]:
    yield first
    yield from rest


def _validated(record: Record, fmt: str):
    from onecard.data.formats import record_text, to_messages

    if fmt == "text":
        return record_text(record)
    return to_messages(record, fmt)


class _TokenCounter:
    """Token lengths as the trainer builds them: chat/alpaca through the chat template, text with EOS appended."""

    def __init__(self, recipe, tokenizer, fmt: str):
        from onecard.data.templates import resolve_template

        self.tokenizer, self.fmt, self.seq_len = tokenizer, fmt, recipe.data.seq_len
        self.pretrain = recipe.task == "pretrain"
        self.template = resolve_template(tokenizer, recipe.data.chat_template) if fmt in CONVERSATION_FORMATS else None
        self.template_name = recipe.data.chat_template
        self.tools_checked = False
        self.lengths: list[int] = []
        self.truncated: list[int] = []
        self.unit = "line"

    def add(self, record: Record, content) -> None:
        from onecard.data.formats import has_tool_turns
        from onecard.data.masking import tokenize_chat
        from onecard.data.templates import require_tool_turns

        if self.fmt == "text":
            ids = list(self.tokenizer(content, add_special_tokens=True)["input_ids"])
            n = len(ids) + (0 if self.tokenizer.eos_token_id is None or ids[-1:] == [self.tokenizer.eos_token_id] else 1)
        elif not any(m["role"] == "assistant" for m in content):
            return  # dropped by the trainer: nothing to learn from
        else:
            if not self.tools_checked and has_tool_turns(content):  # what preparing the data would refuse
                require_tool_turns(self.tokenizer, self.template, self.template_name, record.where)
                self.tools_checked = True
            n = len(tokenize_chat(self.tokenizer, self.template, content, where=record.where)[0])
        self.lengths.append(n)
        if n > self.seq_len and not self.pretrain:  # pre-training packs documents into seq_len blocks
            self.truncated.append(record.line)
            self.unit = record.unit

    def finish(self, report: DataStatsReport) -> None:
        lengths = sorted(self.lengths)
        report.examples = len(lengths)
        if lengths:
            report.mean_tokens = sum(lengths) / len(lengths)
            report.mean_tokens_trained = sum(min(n, self.seq_len) for n in lengths) / len(lengths)
            report.p95_tokens = lengths[min(len(lengths) - 1, math.ceil(0.95 * len(lengths)) - 1)]
            report.max_tokens = lengths[-1]
        report.truncated = len(self.truncated)
        report.truncated_lines = self.truncated[:LINES_SHOWN]
        report.unit = self.unit


# --------------------------------------------------------------------------- cache (for onecard plan)


def _cache_name(recipe, path: str) -> str | None:
    from onecard.cache import file_key

    file = Path(path)
    if not file.is_file():
        return None
    d = recipe.data
    return f"{file.stem}-" + file_key(file, recipe.model.name_or_path, d.seq_len, d.format, d.chat_template,
                                      recipe.task, STATS_FORMAT)


def store_stats(recipe, report: DataStatsReport) -> None:
    from onecard.cache import write_json

    name = _cache_name(recipe, report.path)
    if name is not None and report.mean_tokens is not None:
        write_json("data-stats", name, report.to_dict())


def cached_stats(recipe, path: str) -> DataStatsReport | None:
    """The stats ``onecard lint`` measured for this file, model and data settings, or None."""
    from onecard.cache import read_json

    name = _cache_name(recipe, path)
    found = read_json("data-stats", name) if name else None
    try:
        return DataStatsReport(**found) if found else None
    except TypeError:
        return None


def measured_data(recipe) -> tuple[DataStatsReport | None, str]:
    """The training file's stats for ``onecard plan``: cached by lint, else measured now (and cached) with the
    model's local tokenizer, else records counted without tokens. (report or None, one line saying which)."""
    path = recipe.data.path
    report = cached_stats(recipe, path)
    if report is not None:
        return report, f"data: {path}: measured by onecard lint (cached)"

    tokenizer = load_local_tokenizer(recipe) if recipe.task in ("sft", "pretrain") else None
    try:
        report = scan_file(recipe, path, tokenizer)
    except UserError as exc:
        return None, f"data not used for time and cost: {exc.where + ': ' if exc.where else ''}{exc.what} (onecard lint)"
    store_stats(recipe, report)
    return report, f"data: {path}: measured now with the model's tokenizer (cached)" if tokenizer is not None \
        else f"data: {path}: records counted; {report.note}"


def load_local_tokenizer(recipe):
    """The model's tokenizer when it is local: a model directory's, or a .gguf file's (from its dequantised copy
    when onecard made one, else read from the file by transformers)."""
    path = Path(recipe.model.name_or_path).expanduser()
    kwargs = {}
    if path.suffix == ".gguf" and path.is_file():
        from onecard.cache import GGUF_MARKER, gguf_cache_dir

        done = gguf_cache_dir(path)
        path, kwargs = (done, {}) if (done / GGUF_MARKER).is_file() else (path.parent, {"gguf_file": path.name})
    elif not (path / "tokenizer_config.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception:  # an unloadable tokenizer is reported by the data loader, not here
        return None
