"""Data-preparation benchmark through the real CLI (docs/benchmarks.md, "Data preparation").

For each repeat: an empty data cache, then ``onecard train`` (max_steps 1, the demo's SmolLM2-135M GGUF,
packing at seq 2048) twice -- the first launch tokenises, the second reads the cache -- each under
``/usr/bin/time -v``; plus the same recipe on a 200-example file, whose peak RSS is the model's own.
``--prepare-only`` runs ``onecard data`` instead of training (the 500,000-example scaling check).
Rows are appended as JSON lines with the command, date, load average and versions.

    python3 bench/data_prep.py --data /tmp/chat50k.jsonl --repeats 2 --out bench/results/data_prep_2026-12-02.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = """name: dataprep
model: {{name_or_path: {model}, dtype: auto}}
method: lora
task: sft
data: {{path: {data}, format: chat, seq_len: 2048, packing: true}}
training: {{max_steps: 1, micro_batch_size: 1, grad_accum: 1, optimizer: adamw_torch, grad_ckpt: false,
           kernels: none, seed: 42}}
output_dir: {out}
"""


def timed(cmd: list[str], env: dict[str, str]) -> dict:
    """Wall seconds and peak RSS (largest process of the tree, /usr/bin/time -v) of one command."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    hours, minutes, seconds = (float(g or 0) for g in wall.groups())
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    cpu_s = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for kind in ("User", "System"))
    return {"wall_s": round(hours * 3600 + minutes * 60 + seconds, 2), "cpu_s": round(cpu_s, 2),
            "peak_rss_gib": round(rss_kb / 2**20, 3),
            "used_cache": "from the cache, not re-tokenised" in proc.stderr}


def prep_seconds(cache: Path) -> dict:
    metas = [json.loads(p.read_text()) for p in cache.glob("*/meta.json")]
    return {"phase_seconds": metas[0]["seconds"], "workers": metas[0]["workers"]} if len(metas) == 1 else {}


def versions() -> dict:
    import datasets
    import tokenizers
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "datasets": datasets.__version__, "tokenizers": tokenizers.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="chat JSONL (bench/make_chat_data.py)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prepare-only", action="store_true", help="onecard data instead of onecard train")
    parser.add_argument("--out", required=True, help="JSON lines file to append to")
    args = parser.parse_args()
    from onecard.train.gguf_import import find_smollm2_gguf

    work = Path(tempfile.mkdtemp(prefix="onecard-dataprep-"))
    data = Path(args.data).resolve()
    small = work / "small.jsonl"
    with open(data) as src, open(small, "w") as dst:
        dst.writelines(line for _, line in zip(range(200), src))
    model, base = find_smollm2_gguf(), {"date": datetime.date.today().isoformat(), "data": str(data),
                                        "data_bytes": data.stat().st_size, "versions": versions()}
    for repeat in range(args.repeats):
        for label, path, launches in (("model_only", small, 1), ("full", data, 2)):
            recipe = work / f"{label}.yaml"
            recipe.write_text(RECIPE.format(model=model, data=path, out=work / f"run-{label}"))
            cache = work / f"cache-{label}"
            shutil.rmtree(cache, ignore_errors=True)
            env = {**os.environ, "ONECARD_DATA_CACHE": str(cache)}
            verb = ["data", str(recipe)] if args.prepare_only else ["train", str(recipe), "--overwrite"]
            if label == "model_only" and args.prepare_only:
                continue
            for launch in range(1, launches + 1):
                cmd = [sys.executable, "-m", "onecard.cli", *verb]
                load = os.getloadavg()
                row = {**base, "repeat": repeat + 1, "workload": label, "launch": launch,
                       "command": "onecard " + " ".join(verb), "loadavg_1m_before": round(load[0], 2),
                       **timed(cmd, env), "loadavg_1m_after": round(os.getloadavg()[0], 2)}
                if launch == 1:
                    row.update(prep_seconds(cache))
                if not args.prepare_only:  # the step itself (CPU, seq 2048) is not part of "start to first step"
                    steps_s = json.loads((work / f"run-{label}" / "summary.json").read_text())["train_seconds_measured"]
                    row.update(train_step_s=round(steps_s, 2), to_first_step_s=round(row["wall_s"] - steps_s, 2))
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
