#!/bin/bash
# Device run (issue 5/6 follow-up): QLoRA without fp32 upcast + fused NF4 MLP, onecard train end to end, probe.
# From the repo root on the GPU machine, with .whl-bench carried (bitsandbytes + pydantic, see notes/bench.md).
set -o pipefail
export PYTHONPATH=$PWD/src:$PWD/.whl-bench/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -m onecard.bench --suite src/onecard/bench/suite.yaml --part R2 --json --out $OUT/h200-r2.jsonl > $OUT/r2.log 2>&1; echo "R2 rc=$?"
ONECARD_BENCH_ADAPTER_DTYPE=bfloat16 python -m onecard.bench --model llama-3-8b --method qlora --seq 2048 --batch 8 \
  --rank 16 --grad-ckpt --kernels onecard --steps 4 --warmup 2 --json --out $OUT/h200-r2-bf16adapters.jsonl > $OUT/bf16a.log 2>&1; echo "bf16 adapters rc=$?"
timeout 200 python bench/train_gpu_e2e.py $OUT 2>&1 | tee $OUT/e2e.log | tail -c 3000; echo "e2e rc=$?"
cat > /tmp/probe.yaml <<'Y'
name: probe-8b
model: {name_or_path: llama-3-8b}
method: lora
adapter: {rank: 16}
data: {seq_len: 2048}
training: {micro_batch_size: 8, grad_ckpt: true}
plan: {gpu: h200}
Y
timeout 150 python -m onecard.cli plan /tmp/probe.yaml --probe --json > $OUT/probe.json 2> $OUT/probe.err; echo "probe rc=$?"
python - <<'P'
import json, os
out = os.environ.get("OUT", "/tmp/out")
for f in ("h200-r2.jsonl", "h200-r2-bf16adapters.jsonl"):
    try:
        for line in open(f"{out}/{f}"):
            r = json.loads(line)
            print(f"{r['label']:<55} {r['status']:<5} tok/s {r.get('tokens_per_s') or 0:>8.0f} res {r.get('peak_reserved_gib') or 0:6.2f} "
                  f"alloc {r.get('peak_allocated_gib') or 0:6.2f} plan {r.get('predicted_peak_gib') or 0:6.2f} "
                  f"base {r.get('baseline_tokens_per_s') or 0:8.0f} {r.get('baseline_peak_reserved_gib') or 0:6.2f} {r.get('error', '')[:80]}")
    except OSError as e:
        print(e)
try:
    p = json.load(open(f"{out}/probe.json")); print("probe best", p.get("best"), p.get("set"))
    for t in p.get("tried", []): print("  ", t)
except Exception as e:
    print("probe", e)
P
