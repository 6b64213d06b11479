"""Installed packages' versions, read from their metadata without importing them, and release comparison."""

from __future__ import annotations


def installed_version(dist: str) -> str | None:
    """Installed distribution version via importlib.metadata (no import of the package itself)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def version_tuple(text: str) -> tuple[int, ...]:
    """(5, 24, 0) of "5.24.0", "5.24.0.dev0" or "5.24.0+cu130": the first three release numbers."""
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)
