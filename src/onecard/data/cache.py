"""Where prepared data lives: one directory per (data source content, tokenizer, chat template, data fields).

An entry is written into a temp directory and renamed into place, and its ``meta.json`` is written last, so a
crash or kill leaves no entry that looks complete; two processes building the same entry (N ranks of one run)
both finish and the first rename wins. Nothing here imports torch or ``datasets``: the planner reads
:func:`read_stats` without loading a tokenizer.

Cache root: ``$ONECARD_DATA_CACHE`` if set, else ``$ONECARD_CACHE/data``, else ``~/.cache/onecard/data``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

CACHE_FORMAT = 2  # part of every key: bump when what an entry holds, or how it is built, changes
META = "meta.json"


def cache_root() -> Path:
    if os.environ.get("ONECARD_DATA_CACHE"):
        return Path(os.environ["ONECARD_DATA_CACHE"])
    base = os.environ.get("ONECARD_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "onecard") / "data"


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Content hash of the data file (~0.1 s per 100 MB): a file rewritten with the same size and mtime still rebuilds."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids: the backend's full serialisation (vocab, merges, pre/post-processing) for
    fast tokenizers, the vocabulary for slow ones, and the special tokens either way -- except the pad token,
    which the trainer sets to EOS when a tokenizer has none (``onecard data`` need not repeat that)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if k != "pad_token"}  # pads never reach a label
    extra = json.dumps([type(tokenizer).__name__, special], sort_keys=True, default=str)
    return hashlib.sha256((body + extra).encode()).hexdigest()


def cache_key(recipe, split: str, source_hash: str, tokenizer_fp: str, template: str | None) -> str:
    """Every input of the prepared data; ``source_hash`` is the source's fingerprint (a file's or directory's
    content hash, a hub id's revision and resolved files: onecard.data.sources.fingerprint). ``training.seed``
    only matters where it picks the eval_fraction split."""
    data = recipe.data.model_dump(mode="json")
    parts: dict[str, Any] = {"format": CACHE_FORMAT, "split": split, "task": recipe.task, "data": data,
                             "file": source_hash, "tokenizer": tokenizer_fp,
                             "template": hashlib.sha256(template.encode()).hexdigest() if template else None}
    if data["eval_fraction"] and not data["eval_path"]:
        parts["seed"] = recipe.training.seed
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def entry_dir(key: str) -> Path:
    return cache_root() / key


def read_meta(entry: Path) -> dict[str, Any] | None:
    """The entry's metadata, or None if the entry is absent or incomplete."""
    try:
        return json.loads((entry / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def new_build_dir(key: str) -> Path:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))


def publish(build: Path, key: str, meta: dict[str, Any], replace: bool = False) -> Path:
    """Write ``meta.json`` last and rename the build directory into place (over an existing entry when
    ``replace``: a rebuild); returns the entry."""
    (build / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    target = entry_dir(key)
    if replace:
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(build, target)  # atomic on one filesystem
    except OSError:
        if read_meta(target) is None:  # a stale incomplete entry: replace it
            shutil.rmtree(target, ignore_errors=True)
            os.rename(build, target)
        else:  # another process finished the same entry first: keep theirs
            shutil.rmtree(build, ignore_errors=True)
    _write_pointer(meta)
    return target


def _pointer_path(data_path: str, split: str) -> Path:
    name = hashlib.sha256(f"{Path(data_path).resolve()}|{split}".encode()).hexdigest()[:24]
    return cache_root() / "by-path" / f"{name}.json"


def _write_pointer(meta: dict[str, Any]) -> None:
    """The newest statistics per (data file, split), for readers that have no tokenizer (the planner)."""
    pointer = _pointer_path(meta["source"]["path"], meta["split"])
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"source": meta["source"], "key": meta["key"], "summary": meta["summary"]}), encoding="utf-8")
    os.replace(tmp, pointer)


def read_stats(data_path: str | Path, split: str = "train") -> dict[str, Any] | None:
    """Statistics of the newest prepared data for this file (``onecard data`` or a training launch), or None.

    Checked against the file's size and mtime, not its hash, so this stays fast (no read of the file);
    the keys are those of :func:`onecard.data.stats.summarize` (``examples``, ``mean_tokens_per_example``, ...).
    The tokenizer it was prepared with is the one of that run, which for a planner is the recipe's model.
    """
    path = Path(data_path)
    try:
        pointer = json.loads(_pointer_path(str(path), split).read_text(encoding="utf-8"))
        stat = path.stat()
    except (OSError, ValueError):
        return None
    source = pointer["source"]
    if source["size"] != stat.st_size or source["mtime_ns"] != stat.st_mtime_ns:
        return None
    return pointer["summary"]
