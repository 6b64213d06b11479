#!/usr/bin/env bash
# The S18 target shapes at seq 2048 one by one (each under its own timeout): streamed + capped first, then uncapped.
# Run from the worktree root on the GPU machine; writes $OUT/log and $OUT/s18.jsonl.
set -o pipefail
S="python -m onecard.cli bench --suite src/onecard/bench/suite.yaml --json --out $OUT/s18.jsonl"
summ() { python -c "
import json
for l in open('$OUT/s18.jsonl'):
    d=json.loads(l)
print({k:d.get(k) for k in ('label','status','error','tokens_per_s','peak_reserved_gib','predicted_peak_gib','predicted_tokens_per_s','stream_host_gib','stream_copies','stream_on_demand','build_s')})" 2>&1 | tee -a $OUT/log; }
python - <<'PY'
import yaml
cfgs = [c for c in yaml.safe_load(open("src/onecard/bench/suite.yaml"))["configs"] if c.get("part") == "S18"]
for i, c in enumerate(cfgs):
    c = dict(c); c["part"] = f"one{i}"
    open(f"/tmp/s18_{i}.yaml", "w").write(yaml.safe_dump({"defaults": {"method": "lora", "rank": 16, "grad_ckpt": True, "kernels": "none", "steps": 3, "warmup": 2}, "configs": [c]}))
PY
for i in 2 0 3 1; do
  timeout 55 python -m onecard.cli bench --suite /tmp/s18_$i.yaml --json --out $OUT/s18.jsonl > /dev/null 2>>$OUT/err || echo "config $i rc=$?" | tee -a $OUT/log
  summ
done
free -g | tee -a $OUT/log
