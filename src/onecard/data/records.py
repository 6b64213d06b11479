"""Reading data files into records that remember where they came from.

Every record keeps its file and line (or row) so any later complaint -- a missing field, an unknown
role -- can say exactly where to look. Parquet and CSV go through ``datasets`` (it handles their
types and encodings); JSONL and JSON are parsed here line by line, because ``datasets`` reports a
malformed line as an Arrow/pandas exception without the line number, and non-UTF-8 bytes as a
byte offset in a chunk. The user needs "data.jsonl:17: ...", so we read those two ourselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from onecard.errors import UserError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TABLE_SUFFIXES = (".parquet", ".csv")
SUPPORTED = JSON_SUFFIXES + TABLE_SUFFIXES


@dataclass(frozen=True)
class Record:
    """One example as read from disk. ``line`` is 1-based (CSV: the file line, header = 1; Parquet: row + 1)."""

    data: dict[str, Any]
    path: str
    line: int
    unit: str = "line"  # "line" for text files, "row" for Parquet

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path} (row {self.line})"


def read_records(path: str | Path) -> list[Record]:
    """Read every record of a JSONL/JSON/Parquet/CSV file; raises :class:`UserError` on anything malformed."""
    path = check_data_file(path)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES and not is_json_array(path):
        records = [as_record(obj, path, line) for line, _, _, obj in iter_json_lines(path)]
    elif suffix in JSON_SUFFIXES:
        records = _read_json_array(path, "\n".join(_decode_lines(path)))
    else:
        records = _read_table(path, suffix)
    if not records:
        raise UserError("data file holds no records", where=str(path), fix=_EXAMPLE_FIX)
    return records


def check_data_file(path: str | Path) -> Path:
    """The path, if it names a readable, non-empty data file of a supported type; else a UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError("data file not found", where=str(path), fix="check data.path in the recipe (relative paths start from the current directory)")
    if path.is_dir():
        raise UserError("data.path is a directory, not a file", where=str(path), fix="point data.path at one .jsonl/.json/.parquet/.csv file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise UserError(
            f"unknown data file type {suffix or '(no extension)'!r}",
            where=str(path),
            fix=f"convert it to one of {', '.join(SUPPORTED)} (JSONL: one JSON object per line, e.g. "
            '{"messages": [...]} or {"text": "..."})',
        )
    if path.stat().st_size == 0:
        raise UserError("data file is empty", where=str(path), fix=_EXAMPLE_FIX)
    return path


def is_json_array(path: Path) -> bool:
    """True when the file's first non-blank character is ``[`` (one JSON array, not JSON lines)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            head = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")
            if head:
                return head.startswith(b"[")
    raise UserError("data file is empty (only whitespace)", where=str(path), fix=_EXAMPLE_FIX)


def iter_json_lines(path: Path) -> Iterator[tuple[int, int, int, Any]]:
    """``(line, byte offset, byte length, parsed object)`` of each non-blank line, streamed: memory stays flat
    however large the file. The offsets let a worker process re-read one line without holding the file."""
    with open(path, "rb") as f:
        offset = 0
        for number, raw in enumerate(f, start=1):
            start, size = offset, len(raw)
            offset += size
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, start, size = raw[3:], start + 3, size - 3  # a UTF-8 byte-order mark is harmless
            text = _decode_line(raw.rstrip(b"\n"), path, number)
            if not text.strip():
                continue
            yield number, start, size, parse_json_line(text, path, number)


def parse_json_line(text: str, path: Path | str, number: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"malformed JSON at column {exc.colno}: {exc.msg}",
            where=f"{path}:{number}",
            fix="each line must be one complete JSON object; check quotes, commas and brackets on this line",
        ) from None


_EXAMPLE_FIX = (
    'add examples, one JSON object per line, e.g. {"messages": [{"role": "user", "content": "Hi"}, '
    '{"role": "assistant", "content": "Hello!"}]}'
)


def _decode_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark is harmless; strip it rather than complain
    return [_decode_line(line, path, number) for number, line in enumerate(raw.split(b"\n"), start=1)]


def _decode_line(line: bytes, path: Path, number: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"line is not valid UTF-8 (byte {exc.start + 1} of the line: {line[exc.start:exc.start + 1]!r})",
            where=f"{path}:{number}",
            fix="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`)",
        ) from None


def _read_json_array(path: Path, text: str) -> list[Record]:
    """A JSON file holding a list of objects; ``raw_decode`` element by element to keep each one's line."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    records = []
    try:
        while True:
            pos = _skip_ws(text, pos)
            if text[pos] == "]":
                break
            line = text.count("\n", 0, pos) + 1
            obj, pos = decoder.raw_decode(text, pos)
            records.append(as_record(obj, path, line))
            end, pos = pos, _skip_ws(text, pos)
            if text[pos] == ",":
                pos += 1
            elif text[pos] != "]":  # report where the comma is missing, not where the next element starts
                raise json.JSONDecodeError("expected ',' or ']' after this element", text, end)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"malformed JSON at column {exc.colno}: {exc.msg}",
            where=f"{path}:{exc.lineno}",
            fix="fix the JSON syntax there (quotes, commas, brackets); or write one object per line as .jsonl",
        ) from None
    except IndexError:
        raise UserError("JSON array is not closed", where=f"{path}:{text.count(chr(10)) + 1}", fix="end the file with ']'") from None
    if _skip_ws(text, pos + 1) < len(text):
        line = text.count("\n", 0, pos + 1) + 1
        raise UserError("extra data after the JSON array", where=f"{path}:{line}", fix="remove it, or use one JSON array per file")
    return records


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def as_record(obj: Any, path: Path, line: int, unit: str = "line") -> Record:
    if not isinstance(obj, dict):
        where = f"{path}:{line}" if unit == "line" else f"{path} (row {line})"
        raise UserError(
            f"expected a JSON object, found {type(obj).__name__}",
            where=where,
            fix='each example must be an object such as {"messages": [...]}, {"instruction": ..., "output": ...} or {"text": ...}',
        )
    return Record(obj, str(path), line, unit)


def _read_table(path: Path, suffix: str) -> list[Record]:
    """Parquet/CSV through ``datasets`` (typed columns, quoting rules); stdlib csv where it is not installed."""
    try:
        import datasets
    except ImportError:  # the GPU image lacks datasets; CSV still works, Parquet needs it
        if suffix == ".csv":
            return _read_csv_stdlib(path)
        raise UserError("reading Parquet needs the `datasets` package", where=str(path), fix="pip install datasets, or convert the file to JSONL") from None
    if suffix == ".csv":
        _decode_lines(path)  # datasets buries bad bytes in a DatasetGenerationError; this names the line
    builder = datasets.Dataset.from_parquet if suffix == ".parquet" else datasets.Dataset.from_csv
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a one-file read needs no "Generating train split" bar in the CLI output
    try:
        table = builder(str(path), keep_in_memory=True)
    except Exception as exc:  # pyarrow/pandas parse errors carry no stable type
        raise UserError(f"could not read {suffix[1:]} file: {exc}", where=str(path), fix=f"check that it is a valid {suffix[1:]} file") from None
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    offset, unit = (2, "line") if suffix == ".csv" else (1, "row")
    return [as_record(_decode_json_cells(row), path, i + offset, unit) for i, row in enumerate(table)]


def _read_csv_stdlib(path: Path) -> list[Record]:
    import csv
    import io

    text = "\n".join(_decode_lines(path))  # raises with the line number on bad bytes
    reader = csv.DictReader(io.StringIO(text))
    return [as_record(_decode_json_cells(row), path, reader.line_num) for row in reader]


def _decode_json_cells(row: dict[str, Any]) -> dict[str, Any]:
    """CSV can only hold strings: a ``messages`` cell written as JSON text is parsed back into a list."""
    out = dict(row)
    value = out.get("messages")
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            out["messages"] = json.loads(value)
        except json.JSONDecodeError:
            pass  # left as a string; the format check reports it with the line
    return out
