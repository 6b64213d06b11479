#!/bin/bash
# One device call for the FP8 base: its GPU tests, the GEMM/quantiser timings, then a suite part (default F19-8b).
#   OUT=$OUT [BENCH_S=150] bash bench/gpu_fp8.sh [PART]     (repo root; PYTHONPATH set by the caller)
# F19-8b (the 8B pair) fits BENCH_S=150; F19 (three pairs) wants BENCH_S=420; F19b (14B, one cap) about 200.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
PART=${1:-F19-8b}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fp8_gpu.py > $OUT/gputests.log 2>&1
echo "gpu tests rc=$?"; tail -n 15 $OUT/gputests.log
timeout 40 python3 bench/fp8_gemm_gpu.py > $OUT/gemm.log 2>&1; echo "gemm rc=$?"; cat $OUT/gemm.log | cut -c1-900
timeout ${BENCH_S:-150} python3 -m onecard.cli bench --suite src/onecard/bench/suite.yaml --part $PART --json \
  --out $OUT/h200-fp8.jsonl > $OUT/bench.log 2>&1; echo "bench rc=$?"
python3 - <<'PY'
import json, os
for line in open(os.environ["OUT"] + "/h200-fp8.jsonl"):
    r = json.loads(line)
    print(r["label"], r.get("status"), r.get("error"), "tok/s", r.get("tokens_per_s"), "peak_res", r.get("peak_reserved_gib"),
          "state", r.get("model_state_gib"), "kernels", r.get("kernels_applied"), str(r.get("kernels_detail"))[:200])
PY
