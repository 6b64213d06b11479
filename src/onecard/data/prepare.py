"""Prepare a split into the cache: hash -> read + validate -> tokenise + mask (``datasets.map``, num_proc
workers) -> drop, pack -> statistics -> publish. A later launch with the same inputs only hashes and maps.

Reading streams the file and keeps three integers per record (line, byte offset, byte length), so memory stays
flat with the data; every record is validated before any tokenising, so a bad line is reported at once with
its file:line. Workers re-read their lines by offset. Tokenised columns are written by ``datasets`` as Arrow
files in the entry and read back memory-mapped (:mod:`onecard.data.rows`). JSON arrays, CSV and Parquet are
read whole (:func:`read_records`) and handed to the workers as JSON text: they are rarely large.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onecard.data import cache
from onecard.data.collate import epoch_order
from onecard.data.formats import CONVERSATION_FORMATS, describe_format, detect_format, has_tool_turns, record_text, to_messages
from onecard.data.mapping import mapping_text, remap
from onecard.data.masking import IGNORE_INDEX, tokenize_chats
from onecard.data.records import JSON_SUFFIXES, Record, as_record, is_json_array, iter_json_lines, parse_json_line
from onecard.data.sources import Source, fingerprint, read_source_records, resolve, source_info
from onecard.data.templates import require_tool_turns, resolve_template
from onecard.errors import UserError

EVAL_SPLIT_EPOCH = -1  # the eval split draws from its own (seed, -1) stream, never an epoch's
MIN_RECORDS_PER_WORKER = 2000  # below this a worker process costs more (fork, tokenizer pickle) than it saves
BATCH_RECORDS = 256


@dataclass
class Prepared:
    entry: Path
    meta: dict[str, Any]
    from_cache: bool


def split_path(recipe, split: str) -> str | None:
    """The file a split reads; None for an eval split that is not configured."""
    data = recipe.data
    if split == "eval" and data.eval_path:
        return data.eval_path
    if split == "eval" and not data.eval_fraction:
        return None
    if not data.path:
        raise UserError("no training data given", where="data.path",
                        fix="set data.path to a .jsonl/.json/.parquet/.csv file, a dataset directory or hub:owner/name")
    return data.path


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare(recipe, tokenizer, split: str, phases, num_proc: int | None = None, rebuild: bool = False) -> Prepared | None:
    """The cache entry of ``split``, built if absent (or ``rebuild``); None when the split has no data."""
    data_path = split_path(recipe, split)
    if data_path is None:
        return None
    source = resolve(data_path, recipe.data)
    source_hash = fingerprint(source)
    key = _entry_key(recipe, tokenizer, split, source_hash)
    entry = cache.entry_dir(key)
    meta = None if rebuild else cache.read_meta(entry)
    if meta is not None:
        _say_detected(recipe, split, source, meta)
        return Prepared(entry, meta, from_cache=True)
    index = read_index(source, recipe, phases)
    if index["tools_at"] is not None:
        require_tool_turns(tokenizer, resolve_template(tokenizer, recipe.data.chat_template),
                           recipe.data.chat_template, index["tools_at"])
    chosen = split_records(recipe, split, len(index["line"]))
    build = cache.new_build_dir(key)
    try:
        meta = _build(recipe, tokenizer, split, source.label, index, chosen, build, phases, num_proc)
        meta.update(key=key, split=split, source=source_info(source, source_hash), detected=index["detected"],
                    seconds=dict(phases.seconds))
        _say_detected(recipe, split, source, meta)
        return Prepared(cache.publish(build, key, meta, replace=rebuild), meta, from_cache=False)
    finally:
        if build.exists():
            import shutil

            shutil.rmtree(build, ignore_errors=True)


def _entry_key(recipe, tokenizer, split: str, source_hash: str) -> str:
    template = _template_for_key(tokenizer, recipe.data.chat_template)
    return cache.cache_key(recipe, split, source_hash, cache.tokenizer_fingerprint(tokenizer), template)


def prepared_meta(recipe, tokenizer, split: str = "train") -> dict[str, Any] | None:
    """The published entry's meta when this split was already prepared from the same content, tokenizer, template
    and data fields (every record passed the same validation then), else None. Costs one hash of the source."""
    data_path = split_path(recipe, split)
    if data_path is None:
        return None
    source = resolve(data_path, recipe.data)
    return cache.read_meta(cache.entry_dir(_entry_key(recipe, tokenizer, split, fingerprint(source))))


def _say_detected(recipe, split: str, source: Source, meta: dict[str, Any]) -> None:
    """One line on stderr naming the format ``data.format: auto`` found (once per source: an eval_fraction
    split reads the training file again)."""
    if not meta.get("detected") or (split == "eval" and not recipe.data.eval_path):
        return
    import sys

    name = Path(source.label).name if source.is_file else source.label
    print(f"data: detected {meta['detected']} in {name}{mapping_text(recipe.data.columns, recipe.data.roles)}",
          file=sys.stderr)


def _template_for_key(tokenizer, name: str) -> str | None:
    try:
        return resolve_template(tokenizer, name)
    except UserError:  # raised again, where it matters, once the format is known
        return None


def read_index(source: Source, recipe, phases) -> dict[str, Any]:
    """Read and validate every record; returns the format and, per record, where to find it again.

    A JSONL file is streamed and its records re-read by offset in the workers; every other source (and a JSONL
    file read through ``data.columns``/``data.roles``, whose renamed records the workers need) is handed over as
    JSON text per record."""
    data = recipe.data
    advance = phases.bar("reading", None)
    path = source.path
    if source.is_file and path.suffix.lower() in JSON_SUFFIXES and not is_json_array(path):
        mapped = bool(data.columns or data.roles)
        index: dict[str, Any] = {"line": [], "offset": [], "nbytes": [], "json": [] if mapped else None, "unit": "line"}
        check = None
        for line, offset, nbytes, obj in iter_json_lines(path):
            record = remap(as_record(obj, path, line), data.columns, data.roles)
            check = check or _validator(record, recipe)
            check(record)
            index["line"].append(line), index["offset"].append(offset), index["nbytes"].append(nbytes)
            if mapped:
                index["json"].append(json.dumps(record.data))
            advance()
        if check is None:
            raise UserError("data file holds no records", where=str(path), fix="add examples, one JSON object per line")
        if mapped:
            index["offset"] = index["nbytes"] = None
        return {**index, "format": check.format, "tools_at": check.tools_at, "detected": check.detected}
    records = read_source_records(source, data.columns, data.roles)
    check = _validator(records[0], recipe)
    for record in records:
        check(record)
        advance()
    return {"line": [r.line for r in records], "offset": None, "nbytes": None, "unit": records[0].unit,
            "json": [json.dumps(r.data) for r in records], "format": check.format, "tools_at": check.tools_at,
            "detected": check.detected}


def _validator(first: Record, recipe):
    """A check for each record of the format the first record (or ``data.format``) names; it notes the first
    record with tool turns (``tools_at``) for the chat-template check."""
    fmt = detect_format([first], recipe.data.format, recipe.task)
    if fmt in CONVERSATION_FORMATS:
        def check(record):
            if has_tool_turns(to_messages(record, fmt)) and check.tools_at is None:
                check.tools_at = record.where
    else:
        def check(record):
            record_text(record)
    check.format = fmt
    check.tools_at = None
    check.detected = describe_format(fmt, first) if recipe.data.format == "auto" else None
    return check


def split_records(recipe, split: str, n_records: int) -> list[int] | None:
    """Record numbers of the split when ``data.eval_fraction`` carves it out of ``data.path`` (else all)."""
    data = recipe.data
    if data.eval_path or not data.eval_fraction:
        return None
    n_eval = max(1, round(n_records * data.eval_fraction))
    if n_eval >= n_records:
        raise UserError(
            f"data.eval_fraction={data.eval_fraction} leaves no training records out of {n_records}",
            where="data.eval_fraction",
            fix="lower data.eval_fraction, add records, or give a separate data.eval_path",
        )
    order = epoch_order(n_records, recipe.training.seed, EVAL_SPLIT_EPOCH)
    return sorted(order[:n_eval]) if split == "eval" else sorted(order[n_eval:])


def _build(recipe, tokenizer, split, path, index, chosen, build: Path, phases, num_proc) -> dict[str, Any]:
    import datasets

    from onecard.data.store import finish_store
    from onecard.data.progress import worker_reports

    fmt = index["format"]
    columns = {k: index[k] for k in ("line", "offset", "nbytes", "json") if index[k] is not None}
    table = datasets.Dataset.from_dict(columns)
    if chosen is not None:
        table = table.select(chosen)
    template = resolve_template(tokenizer, recipe.data.chat_template) if fmt in CONVERSATION_FORMATS else None
    workers = max(1, min(num_proc or default_workers(), len(table) // MIN_RECORDS_PER_WORKER))
    if workers > 1:  # the Rust tokenizer's own threads would fight the workers for the same cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    advance = phases.bar("tokenising", len(table))
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # ours shows examples/s and ETA; datasets' would be a second bar
    try:
        with worker_reports(advance, workers) as report:
            kwargs = {"path": str(path), "unit": index["unit"], "fmt": fmt, "task": recipe.task, "tokenizer": tokenizer,
                      "template": template, "seq_len": recipe.data.seq_len, "report": report}
            store = table.map(tokenise_batch, batched=True, batch_size=BATCH_RECORDS, num_proc=workers if workers > 1 else None,
                              fn_kwargs=kwargs, remove_columns=table.column_names, features=_features(recipe.task),
                              cache_file_name=str(build / "store.arrow"), new_fingerprint=build.name,
                              desc="tokenising")
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    files = [Path(f["filename"]).name for f in store.cache_files]
    lines = index["line"] if chosen is None else [index["line"][i] for i in chosen]
    meta = finish_store(store, recipe, split, fmt, files, build, phases,
                        where=lambda i: Record({}, str(path), lines[i], index["unit"]).where)
    meta["workers"] = workers
    return meta


def _features(task: str):
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    if task == "pretrain":
        return datasets.Features({"input_ids": ids, "n_tokens": datasets.Value("int32")})
    return datasets.Features({"input_ids": ids, "labels": ids, "n_tokens": datasets.Value("int32"),
                              "trained": datasets.Value("int32"), "error": datasets.Value("string")})


def tokenise_batch(batch, *, path, unit, fmt, task, tokenizer, template, seq_len, report) -> dict[str, list]:
    """``datasets.map`` function: the records of ``batch`` (by offset or JSON text) -> tokenised, masked, truncated."""
    records = list(_load_records(batch, path, unit))
    if task == "pretrain":
        docs = [list(ids) for ids in tokenizer([record_text(r) for r in records], add_special_tokens=True)["input_ids"]]
        eos = tokenizer.eos_token_id
        report(len(records))
        return {"input_ids": [d + [eos] if eos is not None and (not d or d[-1] != eos) else d for d in docs],
                "n_tokens": [len(d) for d in docs]}
    out: dict[str, list] = {"input_ids": [], "labels": [], "n_tokens": [], "trained": [], "error": []}
    for record, (ids, labels, error) in zip(records, _tokenise_sft(records, fmt, tokenizer, template)):
        out["n_tokens"].append(len(ids))
        ids, labels = ids[:seq_len], labels[:seq_len]
        out["input_ids"].append(ids), out["labels"].append(labels), out["error"].append(error)
        tail = labels[1:]  # the causal shift: position 0 is never a target
        out["trained"].append(len(tail) - tail.count(IGNORE_INDEX))
    report(len(records))
    return out


def _load_records(batch, path: str, unit: str):
    if "json" in batch:
        for line, text in zip(batch["line"], batch["json"]):
            yield Record(json.loads(text), path, line, unit)
        return
    with open(path, "rb") as f:
        for line, offset, nbytes in zip(batch["line"], batch["offset"], batch["nbytes"]):
            f.seek(offset)
            yield Record(parse_json_line(f.read(nbytes).decode("utf-8"), path, line), path, line, unit)


def _tokenise_sft(records: list[Record], fmt: str, tokenizer, template: str | None):
    """``(ids, labels, error)`` per record; a template refusing one record is kept as its error (reported in file order)."""
    if fmt == "text":  # SFT on raw text trains every token, ending with EOS
        encoded = tokenizer([record_text(r) for r in records], add_special_tokens=True)["input_ids"]
        eos = tokenizer.eos_token_id
        docs = [list(ids) + ([eos] if eos is not None and (not ids or ids[-1] != eos) else []) for ids in encoded]
        return [(ids, [IGNORE_INDEX] + ids[1:], None) for ids in docs]
    messages = [to_messages(r, fmt) for r in records]
    trainable = [i for i, m in enumerate(messages) if any(x["role"] == "assistant" for x in m)]
    results: list[tuple[list[int], list[int], str | None]] = [([], [], None)] * len(records)  # no assistant: dropped
    try:
        pairs = tokenize_chats(tokenizer, template, [messages[i] for i in trainable], [records[i].where for i in trainable])
    except UserError:  # one record's template error: find which, one at a time
        pairs = [_one(tokenizer, template, messages[i], records[i].where) for i in trainable]
    for i, pair in zip(trainable, pairs):
        results[i] = pair if len(pair) == 3 else (*pair, None)
    return results


def _one(tokenizer, template, messages, where):
    try:
        return tokenize_chats(tokenizer, template, [messages], [where])[0]
    except UserError as exc:
        return [], [], json.dumps([exc.what, exc.where, exc.fix])
