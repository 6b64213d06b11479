"""Where records come from: one file, a ``datasets`` directory (``save_to_disk``), a directory of Parquet/Arrow
files, or a hub id ``hub:owner/name`` -- the last three read through ``datasets`` and its cache.

Each source has a fingerprint for the prepared-data cache key (a file's or a directory's content hash; for a hub
id the revision asked for and the Arrow files ``datasets`` resolved it to, whose directory name is its hash of the
repository's data files), so a changed source is prepared again. Rows of the ``datasets`` sources become records
whose ``where`` names the source and the row (``hub:owner/name[train] (row 17)``), like a Parquet file's rows.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onecard.data.cache import file_sha256
from onecard.data.mapping import remap
from onecard.data.records import Record, as_record, check_data_file, read_records
from onecard.errors import UserError

HUB_PREFIX = "hub:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SPLIT_SUFFIX = re.compile(r"^(?P<name>.+)\[(?P<split>[\w.-]+)\]$")
TABLE_FILES = (".parquet", ".arrow")


@dataclass
class Source:
    """``kind``: file | saved (save_to_disk) | files (Parquet/Arrow directory) | hub. ``label`` starts every
    ``where`` of its records; ``path`` is the local file or directory (None for a hub id)."""

    spec: str
    kind: str
    label: str
    path: Path | None = None
    hub_id: str | None = None
    split: str | None = None
    revision: str | None = None
    _dataset: Any = field(default=None, repr=False)

    @property
    def is_file(self) -> bool:
        return self.kind == "file"


def resolve(spec: str, data) -> Source:
    """The source ``spec`` names (``data.path``-style), checked to exist; a UserError naming it otherwise."""
    if spec.startswith(HUB_PREFIX):
        name, split = _split_suffix(spec[len(HUB_PREFIX):].strip(), data.split)
        if not _HUB_ID.match(name):
            raise UserError(f"{spec!r} is not a hub dataset id", where="data.path",
                            fix="write hub:owner/name (e.g. hub:HuggingFaceH4/no_robots); data.split picks the split")
        return Source(spec, "hub", f"hub:{name}[{split}]", hub_id=name, split=split, revision=data.revision)
    path = Path(spec)
    if not path.is_dir():
        return Source(spec, "file", str(path), path=check_data_file(path))
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return Source(spec, "saved", f"{path}/", path=path, split=data.split)
    kinds = {p.suffix.lower() for p in _table_files(path)}
    if not kinds:
        raise UserError("data.path is a directory with no dataset in it", where=str(path),
                        fix="point data.path at a .jsonl/.json/.parquet/.csv file, a directory written by datasets' "
                            "save_to_disk, or a directory of .parquet or .arrow files")
    if len(kinds) > 1:
        raise UserError("the directory holds both .parquet and .arrow files", where=str(path),
                        fix="keep one kind of file in it, or point data.path at one file")
    return Source(spec, "files", f"{path}/", path=path, split=data.split)


def _split_suffix(name: str, split: str) -> tuple[str, str]:
    """``owner/name[test]`` names its split itself (an eval split of the same repository); else data.split."""
    match = _SPLIT_SUFFIX.match(name)
    return (match["name"], match["split"]) if match else (name, split)


def _table_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in TABLE_FILES and p.is_file())


def fingerprint(source: Source) -> str:
    """What identifies the source's content, for the cache key."""
    if source.is_file:
        return file_sha256(source.path)
    if source.kind == "hub":
        dataset = load(source)
        files = [Path(f["filename"]) for f in dataset.cache_files]
        ident = [source.hub_id, source.split, source.revision] + [f"{f.parent.name}/{f.name}:{f.stat().st_size}" for f in files]
        return hashlib.sha256(repr(ident).encode()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in source.path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(source.path)}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def read_source_records(source: Source, columns: dict[str, str], roles: dict[str, str]) -> list[Record]:
    """Every record of the source, with ``data.columns``/``data.roles`` applied."""
    if source.is_file:
        records = read_records(source.path)
    else:
        records = [as_record(row, source.label, i + 1, unit="row") for i, row in enumerate(load(source))]
        if not records:
            raise UserError("the dataset holds no rows", where=source.label, fix="check data.split and the source")
    return [remap(r, columns, roles) for r in records] if columns or roles else records


def load(source: Source):
    """The ``datasets.Dataset`` of a directory or hub source (loaded once per Source)."""
    if source._dataset is None:
        import datasets

        was_enabled, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
        # onecard's one-line notices instead of datasets' "Generating split" bars and its "Using the latest
        # cached version" warnings (an uncached id offline is a UserError below)
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        try:
            source._dataset = _load_hub(source) if source.kind == "hub" else _load_local(source)
        finally:
            datasets.logging.set_verbosity(verbosity)
            if was_enabled:
                datasets.enable_progress_bars()
    return source._dataset


def _load_local(source: Source):
    import datasets

    try:
        if source.kind == "saved":
            loaded = datasets.load_from_disk(str(source.path))
        else:
            loaded = datasets.load_dataset(str(source.path), split=source.split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise _unknown_split(source, str(exc)) from None
        raise UserError(f"datasets could not read the directory: {exc}", where=source.label,
                        fix="check that it was written by save_to_disk, or holds valid .parquet/.arrow files") from None
    except Exception as exc:  # pyarrow / datasets errors carry no stable type
        raise UserError(f"datasets could not read the directory: {exc}", where=source.label,
                        fix="check that it was written by save_to_disk, or holds valid .parquet/.arrow files") from None
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            raise _unknown_split(source, f"the saved DatasetDict has the splits {', '.join(loaded)}")
        loaded = loaded[source.split]
    return loaded


def _load_hub(source: Source):
    import datasets

    try:
        return datasets.load_dataset(source.hub_id, split=source.split, revision=source.revision)
    except ConnectionError as exc:  # offline or unreachable: datasets gives up at once when HF_HUB_OFFLINE=1
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise UserError(
            f"the hub dataset {source.hub_id!r} is not in the datasets cache"
            + (" and HF_HUB_OFFLINE=1 forbids downloading it" if offline else f" and the hub is unreachable ({exc})"),
            where="data.path",
            fix=f"load it once with network access (python -c \"import datasets; datasets.load_dataset("
                f"'{source.hub_id}')\") so it is cached, or unset HF_HUB_OFFLINE",
        ) from None
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise _unknown_split(source, str(exc)) from None
        raise _hub_error(source, exc) from None
    except Exception as exc:  # DatasetNotFoundError, gated repos, bad revisions: all say what went wrong
        raise _hub_error(source, exc) from None


def _hub_error(source: Source, exc: Exception) -> UserError:
    return UserError(f"datasets could not load {source.hub_id!r}: {type(exc).__name__}: {exc}", where="data.path",
                     fix="check the id, data.revision and your access (huggingface-cli login for gated datasets)")


def _unknown_split(source: Source, detail: str) -> UserError:
    return UserError(f"no split {source.split!r} in {source.label.split('[')[0]}: {detail}", where="data.split",
                     fix="set data.split to one of the dataset's splits (or name it in the path: hub:owner/name[test])")


def source_info(source: Source, fingerprint_hex: str) -> dict[str, Any]:
    """What the cache entry records of its source (size and mtime let the planner's read_stats check a file)."""
    if source.kind == "hub":
        return {"path": source.spec, "kind": "hub", "sha256": fingerprint_hex, "size": None, "mtime_ns": None}
    stat = source.path.stat()
    return {"path": str(source.path.resolve()), "kind": source.kind, "sha256": fingerprint_hex,
            "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
