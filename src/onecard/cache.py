"""Where onecard keeps what it computed once and can reuse: ``$ONECARD_CACHE`` if set, else ``~/.cache/onecard``.

Entries are keyed by the source file's resolved path, size and mtime (:func:`file_key`), so a replaced file
gets a new entry, and written to a temp file renamed into place, so a crash leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("ONECARD_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "onecard"


GGUF_MARKER = "onecard-gguf.json"  # written last, inside the temp dir: its presence means the copy is complete
GGUF_FORMAT = 2  # part of the key of a dequantised GGUF copy: bump when what train/gguf_import.py writes changes


def gguf_cache_dir(path: Path) -> Path:
    """The dequantised copy of a .gguf file: ``gguf/<stem>-<hash of resolved path, size, mtime, format>``, so a
    replaced file (new size or mtime) gets a new entry."""
    return cache_root() / "gguf" / f"{path.stem}-{file_key(path, GGUF_FORMAT)}"


def file_key(path: Path, *extra) -> str:
    """A short hash of ``path``'s resolved name, size and mtime, plus ``extra`` (a format version, settings)."""
    stat = path.stat()
    key = "|".join(str(p) for p in (path.resolve(), stat.st_size, stat.st_mtime_ns, *extra))
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def read_json(kind: str, name: str) -> dict | None:
    """The cached JSON object ``<root>/<kind>/<name>.json``, or None (absent or unreadable: recomputed)."""
    try:
        return json.loads((cache_root() / kind / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(kind: str, name: str, payload: dict) -> None:
    """Write atomically; a read-only cache directory only costs the recomputation next time."""
    folder = cache_root() / kind
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle)
        os.replace(tmp, folder / f"{name}.json")
    except OSError:
        pass
