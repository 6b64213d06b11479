#!/bin/bash
# Device run r3 (issue 5): the 70B QLoRA throughput row re-measured on the bf16 (no-upcast) QLoRA path with
# --baseline, and onecard train end to end (LoRA, QLoRA, DPO) with plan-vs-measured at the run's real lengths.
# From the repo root on the GPU machine, with .whl-bench carried (bitsandbytes + pydantic, see notes/bench.md).
set -o pipefail
export PYTHONPATH=$PWD/src:$PWD/.whl-bench/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 240 python -m onecard.bench --model llama-3-70b --method qlora --seq 2048 --batch 1 --rank 16 --grad-ckpt \
  --kernels onecard --steps 3 --warmup 1 --baseline --json --out $OUT/h200-r3.jsonl > $OUT/r3.log 2>&1; echo "70B rc=$?"
timeout 240 python bench/train_gpu_e2e.py $OUT 2>&1 | tee $OUT/e2e.log | tail -c 2500; echo "e2e rc=$?"
python - <<'P'
import json, os
out = os.environ.get("OUT", "/tmp/out")
for line in open(f"{out}/h200-r3.jsonl"):
    r = json.loads(line)
    print(f"{r['label']:<50} {r['status']} tok/s {r.get('tokens_per_s') or 0:.0f} res {r.get('peak_reserved_gib') or 0:.2f}"
          f" plan {r.get('predicted_peak_gib') or 0:.2f} base {r.get('baseline_tokens_per_s') or 0:.0f}"
          f" {r.get('baseline_peak_reserved_gib') or 0:.2f} {r.get('error', '')[:80]}")
for r in json.load(open(f"{out}/train_e2e.json")):
    p = r.get("plan_vs_measured") or {}
    print(r["name"], r["rc"], r.get("first_loss"), "->", r.get("final_loss"), "steady", r.get("steady_tokens_per_s_measured"),
          "mem err%", p.get("peak_error_pct"), "tok/s err%", p.get("tokens_per_s_error_pct"), p.get("planned_seq_len"))
P
