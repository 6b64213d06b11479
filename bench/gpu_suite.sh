#!/bin/bash
# One device call: onecard's GPU tests, then `onecard bench` suite parts, each part in its own process (its rows are
# one run: ratios are taken within a part) under its own timeout, so one failing part leaves the others' rows.
#   OUT=$OUT bash bench/gpu_suite.sh TEST_SECONDS PART:SECONDS [PART:SECONDS ...]
# Repo root; a site directory with the packages the GPU image lacks on PYTHONPATH (README: GPU install).
# Rows: $OUT/h200-<part lowercased>.jsonl (copied into bench/results/ afterwards); logs: $OUT/<part>.log.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TEST_S=${1:?seconds for the GPU tests (0: none)}; shift
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
# the host's speed, which sets a host-bound step's (docs/kernels.md): its CPU, and us per small CUDA launch queued
lscpu | grep -E "^Model name|^CPU max MHz" | tr -s ' '
python3 - <<'PY'
import time, torch
x = torch.ones(8, device="cuda")
for _ in range(2000):
    x.add_(1)
rounds = []
for _ in range(5):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(20000):
        x.add_(1)
    rounds.append((time.perf_counter() - t0) / 20000 * 1e6)
    torch.cuda.synchronize()
print("host us per queued add_:", " ".join(f"{r:.2f}" for r in rounds))
PY
if [ "$TEST_S" -gt 0 ]; then
  timeout "$TEST_S" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_split_checkpoint.py \
    tests/test_stream_weights.py tests/test_kernels_fp8_gpu.py tests/test_offload.py tests/test_kernels_gpu.py \
    tests/test_adapter_copies.py tests/test_graphed_step.py tests/test_graphed_sft.py \
    > "$OUT/gputests.log" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/gputests.log" | tail -n 12
fi
for spec in "$@"; do
  part=${spec%%:*}; secs=${spec##*:}; rows=$OUT/h200-$(echo "$part" | tr A-Z a-z).jsonl
  timeout "$secs" python3 -m onecard.cli bench --suite src/onecard/bench/suite.yaml --part "$part" --json \
    --out "$rows" > "$OUT/$part.log" 2>&1
  echo "$part rc=$?"
  [ -f "$rows" ] && python3 - "$rows" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(" ", r["label"], r.get("status"), f"tok/s {r.get('tokens_per_s') or 0:.0f}",
          f"res {r.get('peak_reserved_gib') or 0:.2f} plan {r.get('predicted_peak_gib') or 0:.2f}",
          f"pred tok/s {r.get('predicted_tokens_per_s') or 0:.0f}", f"state {r.get('model_state_gib') or 0:.2f}",
          (r.get("error") or "")[:300])
PY
  tail -n 3 "$OUT/$part.log" | cut -c1-400
done
