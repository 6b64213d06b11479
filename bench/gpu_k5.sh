#!/bin/bash
# Device run K5 (issue 6, session 3): LoRA matmul order microbench, DoRA GPU test, DoRA vs LoRA rows (suite part
# K5) with the current order and with ONECARD_LORA_ORDER=lora_first. Repo root, .whl-bench/site carried.
set -o pipefail
export PYTHONPATH=$PWD/src:$PWD/.whl-bench/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
timeout 120 python bench/lora_order_gpu.py > $OUT/lora_order.log 2>&1; echo "order rc=$?"; tail -c 3000 $OUT/lora_order.log
timeout 120 python -m pytest -q -m gpu tests/test_kernels_dora.py tests/test_kernels_lora_linear.py -p no:cacheprovider 2>&1 | tail -3
CMD="python -m onecard.bench --suite src/onecard/bench/suite.yaml --part K5 --json"
timeout 200 $CMD --out $OUT/h200-k5.jsonl > $OUT/k5.log 2>&1; echo "k5 rc=$?"
ONECARD_LORA_ORDER=lora_first timeout 200 $CMD --out $OUT/h200-k5-lorafirst.jsonl.experiment > $OUT/k5b.log 2>&1; echo "k5b rc=$?"
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader
python - <<'P'
import json, os, glob
out = os.environ.get("OUT", "/tmp/out")
for f in sorted(glob.glob(f"{out}/h200-k5*")):
    for line in open(f):
        r = json.loads(line)
        print(os.path.basename(f), r['label'], r['status'], f"tok/s {r.get('tokens_per_s') or 0:.0f} res {r.get('peak_reserved_gib') or 0:.2f}",
              r.get('kernels_applied'), r.get('error', '')[:200])
P
