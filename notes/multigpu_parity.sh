#!/usr/bin/env bash
# Issue 9 acceptance 1: the same small recipe on 1 GPU (micro-batch 4 x accum 2) and on 2 GPUs (micro-batch 2 x
# accum 2 each: the same global batch of 8) for 50 steps; prints the largest relative loss difference (must be < 1%).
# Usage (repo root, PYTHONPATH holding src and the wheels): bash notes/multigpu_parity.sh [OUT_DIR]
# Env: STEPS (50), STRATEGY (auto | ddp | fsdp), KERNELS (none | auto: onecard's fused loss under DDP too), METHOD (lora |
# dora | full), ONECARD_DISTRIBUTED_CPU=1 (CPU dry run).
set -euo pipefail
OUT_DIR=${1:-/tmp/parity}; W=/tmp/parity-work; rm -rf "$W"; mkdir -p "$W" "$OUT_DIR"
python - "$W" <<'PY'
import json, os, sys, yaml
from onecard.tiny import save_counting_job
w = sys.argv[1]
save_counting_job(w, 800)  # {w}/model and {w}/chat.jsonl
for name, mb in (("one", 4), ("two", 2)):
    method = os.environ.get("METHOD", "lora")
    tree = {"name": name, "model": {"name_or_path": f"{w}/model", "dtype": "float32"}, "method": method,
            "data": {"path": f"{w}/chat.jsonl", "seq_len": 128}, **({} if method == "full" else {"adapter": {"rank": 8}}),
            "training": {"max_steps": int(os.environ.get("STEPS", 50)), "micro_batch_size": mb, "grad_accum": 2, "learning_rate": 2e-3,
                         "warmup_steps": 5, "seed": 1,
                         "kernels": os.environ.get("KERNELS", "none")},
            "output_dir": f"{w}/runs/{{name}}"}
    yaml.safe_dump(tree, open(f"{w}/{name}.yaml", "w"))
PY
onecard_cli() { python -m onecard.cli "$@"; }
onecard_cli train "$W/one.yaml" --json > "$OUT_DIR/one.json"
onecard_cli train "$W/two.yaml" --num-gpus 2 --strategy "${STRATEGY:-auto}" --json > "$OUT_DIR/two.json"
cp "$W/runs/one/metrics.jsonl" "$OUT_DIR/one-metrics.jsonl"; cp "$W/runs/two/metrics.jsonl" "$OUT_DIR/two-metrics.jsonl"
python - "$W" <<'PY'
import json, os, sys
w = sys.argv[1]
load = lambda n: [json.loads(l)["loss"] for l in open(f"{w}/runs/{n}/metrics.jsonl")]
one, two = load("one"), load("two")
worst = max(abs(a - b) / abs(a) for a, b in zip(one, two))
print(json.dumps({"steps": [len(one), len(two)], "max_rel_loss_diff": worst, "pass_1pct": worst < 0.01 and len(one) == len(two) == int(os.environ.get("STEPS", 50)),
                  "first": [one[0], two[0]], "last": [one[-1], two[-1]]}))
PY
