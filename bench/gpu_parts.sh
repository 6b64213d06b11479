#!/bin/bash
# A device run on a 2-GPU machine, one `onecard bench` suite part per GPU at once (issue 6, session 3):
#   OUT=$OUT bash bench/gpu_parts.sh PART_GPU0 PART_GPU1 [ce|packing]
# GPU 0 first runs the GPU kernel tests (and, with "ce", bench/ce_chunk_gpu.py), then PART_GPU0; GPU 1 runs PART_GPU1
# (then, with "packing", bench/packing_gpu.py: packed rows, dense mask vs varlen).
# Rows go to $OUT/h200-<part0 lowercased>.jsonl and .jsonl.gpu1 (concatenated into bench/results/ afterwards).
# Runs K6 (K6, then K6b and K6c on GPU 1), K7 (K7 K7b ce) and K8 (K8 K8b) were this script's three earlier copies.
# Repo root, .whl-bench/site carried.
set -o pipefail
export PYTHONPATH=$PWD/src:$PWD/.whl-bench/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
P0=${1:?part for GPU 0}; P1=${2:?part for GPU 1}; ROWS=$OUT/h200-$(echo $P0 | tr A-Z a-z).jsonl
nvidia-smi --query-gpu=index,name,driver_version,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
CMD="python -m onecard.bench --suite src/onecard/bench/suite.yaml --json"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_ce_chunk.py tests/test_kernels_dora.py \
    tests/test_kernels_lora_linear.py tests/test_kernels_gpu.py tests/test_kernels_fused.py tests/test_offload.py \
    tests/test_split_checkpoint.py tests/test_patch_packed.py tests/test_kernels_packing.py \
    > $OUT/gputests.log 2>&1
  echo "gpu tests rc=$?"; tail -n 3 $OUT/gputests.log
  if [ "${3:-}" = ce ]; then timeout 90 python bench/ce_chunk_gpu.py > $OUT/ce_chunk.log 2>&1; echo "ce chunk rc=$?"; fi
  timeout 420 $CMD --part $P0 --out $ROWS > $OUT/$P0.log 2>&1; echo "$P0 rc=$?"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 400 $CMD --part $P1 --out $ROWS.gpu1 > $OUT/$P1.log 2>&1; echo "$P1 rc=$?"
  if [ "${3:-}" = packing ]; then timeout 150 python bench/packing_gpu.py > $OUT/packing.log 2>&1; echo "packing rc=$?"; tail -n 12 $OUT/packing.log; fi
) &
wait
nvidia-smi --query-gpu=index,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
python - $ROWS <<'P'
import json, os, sys
for f in (sys.argv[1], sys.argv[1] + ".gpu1"):
    for line in open(f):
        r = json.loads(line)
        b = r.get("baseline_tokens_per_s")
        print(os.path.basename(f), r["label"], r["status"], f"tok/s {r.get('tokens_per_s') or 0:.0f}",
              f"res {r.get('peak_reserved_gib') or 0:.2f}", f"x{(r.get('tokens_per_s') or 0) / b:.3f}" if b else "",
              r.get("kernels_applied"), r.get("error", "")[:200])
P
