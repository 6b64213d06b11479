"""Small runs for the resume-policy and fault tests: one recipe file per run, the CLI in-process or as a process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml


WIDE = "4000"


def write_chat(path: Path, n: int = 12, long_line: int | None = None) -> Path:
    rows = []
    for i in range(n):
        answer = "yes " * (1 + i % 5) + "the quick brown fox"
        if long_line is not None and i + 1 == long_line:
            answer = "a long answer " * 40
        rows.append({"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(tmp_path: Path, model_dir, name: str, data: Path | None = None, **training) -> Path:
    data = data or write_chat(tmp_path / "chat.jsonl")
    tree = {"name": name, "model": {"name_or_path": str(model_dir)}, "adapter": {"rank": 4, "dropout": 0.2},
            "data": {"path": str(data), "seq_len": 64},
            "training": {"max_steps": 6, "micro_batch_size": 2, "grad_accum": 1, "learning_rate": 1e-2,
                         "optimizer": "adamw_torch", "seed": 5, "grad_ckpt": False, **training},
            "output_dir": str(tmp_path / "runs" / "{name}")}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def run_cli(argv, capsys) -> tuple[int, str, str]:
    from onecard.cli import main

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDE  # rich wraps at the console width, paths included
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        if columns is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = columns
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_process(argv, prelude: str = "", timeout_s: int = 300) -> subprocess.CompletedProcess:
    """``onecard ARGV`` in a fresh Python process; ``prelude`` runs first (it may wrap library functions)."""
    code = f"import sys\n{prelude}\nfrom onecard.cli import main\nmain(sys.argv[1:])\n"
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS=WIDE)
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], env=env, capture_output=True, text=True,
                          timeout=timeout_s)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path: equal digests = the directory is byte for byte the same."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def one_line(text: str) -> str:
    """The message lines as one line (the assertions do not care where a message breaks its lines)."""
    return " ".join(text.split())
