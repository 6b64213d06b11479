#!/bin/bash
# Device run K7 (issue 6, session 3, after K6) on a 2-GPU machine, one part per GPU at once: GPU 0 runs the GPU kernel tests and
# suite part K7 (Llama 3 8B: LoRA with its plain baseline, offloaded, DoRA, QLoRA offloaded); GPU 1 runs K7b (Mistral
# 7B, Qwen 2.5 7B with their baselines, and offloaded, and the 24 GiB cap rows). Repo root, .whl-bench carried.
set -o pipefail
export PYTHONPATH=$PWD/src:$PWD/.whl-bench/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=index,name,driver_version,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
CMD="python -m onecard.bench --suite src/onecard/bench/suite.yaml --json"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_ce_chunk.py tests/test_kernels_dora.py \
    tests/test_kernels_lora_linear.py tests/test_kernels_gpu.py tests/test_kernels_fused.py > $OUT/gputests.log 2>&1
  echo "gpu tests rc=$?"; tail -n 5 $OUT/gputests.log
  timeout 90 python bench/ce_chunk_gpu.py > $OUT/ce_chunk.log 2>&1; echo "ce chunk rc=$?"; grep -A2 '"[0-9]*": {' $OUT/ce_chunk.log | tr -d '\n '; echo
  timeout 420 $CMD --part K7 --out $OUT/h200-k7.jsonl > $OUT/k7.log 2>&1; echo "K7 rc=$?"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 500 $CMD --part K7b --out $OUT/h200-k7.jsonl.gpu1 > $OUT/k7b.log 2>&1; echo "K7b rc=$?"
) &
wait
nvidia-smi --query-gpu=index,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
python - <<'P'
import json, os, glob
out = os.environ.get("OUT", "/tmp/out")
for f in sorted(glob.glob(f"{out}/h200-k7*")):
    for line in open(f):
        r = json.loads(line)
        b = r.get('baseline_tokens_per_s')
        print(os.path.basename(f), r['label'], r['status'], f"tok/s {r.get('tokens_per_s') or 0:.0f} res {r.get('peak_reserved_gib') or 0:.2f}",
              f"base {b or 0:.0f} {r.get('baseline_peak_reserved_gib') or 0:.2f} x{(r.get('tokens_per_s') or 0)/b if b else 0:.3f}",
              r.get('kernels_applied'), r.get('error', '')[:200])
P
