"""`onecard plan` (text and --json) on every example recipe, and the docs/benchmarks.{md,json} regeneration from
every committed bench row, byte for byte against outputs recorded in tests/golden/.

A refactor that moves code between modules must not move a number. Regenerate (only when a change of output is
meant, and say why in the commit): ``PYTHONPATH=src python3 tests/test_golden.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
COLUMNS = "120"


def _package_dir() -> str:
    import onecard

    return str(Path(onecard.__file__).resolve().parent)


def plan_output(recipe: Path, as_json: bool) -> str:
    """What a user sees on a 120-column terminal; the package's own path (the price file) written as {onecard}."""
    args = [sys.executable, "-m", "onecard.cli", "plan", str(recipe)] + (["--json"] if as_json else [])
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "COLUMNS": COLUMNS, "TERM": "dumb"})
    assert proc.returncode == 0, proc.stderr
    return _unplaced(proc.stdout.replace(_package_dir(), "{onecard}"))


def _unplaced(text: str) -> str:
    """rich centres the price file's line, so its padding follows the length of the install path: strip it."""
    return "\n".join(line.strip() if "{onecard}" in line else line for line in text.split("\n"))


def benchmarks_docs(out_dir: Path) -> dict[str, str]:
    """docs/benchmarks.{md,json} as ``python -m onecard.bench.report`` writes them, written into ``out_dir``."""
    proc = subprocess.run([sys.executable, "-m", "onecard.bench.report", "--docs", str(out_dir)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return {name: (out_dir / name).read_text(encoding="utf-8") for name in ("benchmarks.md", "benchmarks.json")}


def _cases() -> list[tuple[str, Path, bool]]:
    return [(f"plan/{p.stem}{'.json' if j else '.txt'}", p, j) for p in EXAMPLES for j in (False, True)]


@pytest.mark.parametrize("name,recipe,as_json", _cases(), ids=[c[0] for c in _cases()])
def test_plan_output_is_unchanged(name, recipe, as_json):
    assert plan_output(recipe, as_json) == _unplaced((GOLDEN / name).read_text(encoding="utf-8"))


def test_benchmarks_docs_are_unchanged(tmp_path):
    fresh = benchmarks_docs(tmp_path)
    for name, text in fresh.items():
        assert text == (GOLDEN / name).read_text(encoding="utf-8"), name
        assert text == (ROOT / "docs" / name).read_text(encoding="utf-8"), f"docs/{name} is stale"


if __name__ == "__main__":
    import tempfile

    (GOLDEN / "plan").mkdir(parents=True, exist_ok=True)
    for case, path, j in _cases():
        (GOLDEN / case).write_text(plan_output(path, j), encoding="utf-8")
    with tempfile.TemporaryDirectory() as d:
        for case, text in benchmarks_docs(Path(d)).items():
            (GOLDEN / case).write_text(text, encoding="utf-8")
    print(f"wrote {GOLDEN}")
