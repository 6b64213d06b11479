#!/usr/bin/env bash
# Issue 9 "checkpoints that resume on the same number of GPUs", on GPUs: a tiny llama LoRA recipe on 2 processes with
# STRATEGY (fsdp: each rank's parameter and optimizer shards in checkpoints/ranks-step-N/) for STEPS steps,
# (a) uninterrupted, (b) the same recipe in another run directory killed right after the step-CRASH_AT checkpoint
# (ONECARD_TEST_CRASH_AT_STEP: every rank os._exit(17)s, as a killed job would) and resumed with --resume.
# Prints one JSON line (also $OUT_DIR/resume.json): the largest relative loss difference between (a) and (b) over the
# steps after the resume (and before it), the largest difference between the two final adapters, and pass flags.
# Also checks the saved adapter is real (LoRA shapes of rank 8, every lora_B trained away from its zero init), since
# under FSDP it is gathered from shards at the end.
# Usage (repo root, PYTHONPATH holding src and the wheels): bash notes/multigpu_resume.sh [OUT_DIR]
# Env: STEPS (12), SAVE_EVERY (4), CRASH_AT (a checkpoint step near STEPS/2), STRATEGY (fsdp | ddp | auto),
#      DROPOUT (0.05: the resumed RNG state must reproduce the masks), ONECARD_DISTRIBUTED_CPU=1 (CPU dry run: gloo;
#      onecard refuses fsdp on CPU -- accelerate would run DDP -- so the script uses ddp there and only the GPU run
#      exercises sharded checkpoints).
set -uo pipefail
OUT_DIR=${1:-/tmp/resume}; W=${RESUME_WORK:-/tmp/resume-work}; rm -rf "$W"; mkdir -p "$W" "$OUT_DIR"
export STEPS=${STEPS:-12} SAVE_EVERY=${SAVE_EVERY:-4}
export CRASH_AT=${CRASH_AT:-$(( (STEPS / 2 / SAVE_EVERY > 0 ? STEPS / 2 / SAVE_EVERY : 1) * SAVE_EVERY ))}
STRATEGY=${STRATEGY:-fsdp}
if [ "${ONECARD_DISTRIBUTED_CPU:-}" = 1 ] && [ "$STRATEGY" = fsdp ]; then
  echo "CPU dry run: onecard refuses fsdp on CPU processes (accelerate would run DDP); using ddp" >&2; STRATEGY=ddp
fi
python - "$W" <<'PY' || { echo '{"error": "setup failed"}' | tee "$OUT_DIR/resume.json"; exit 1; }
import json, os, sys, yaml
from onecard.tiny import save_counting_job
w = sys.argv[1]
save_counting_job(w, 400)  # {w}/model and {w}/chat.jsonl
for name in ("full", "resumed"):  # identical but for the name (and so the run directory)
    tree = {"name": name, "model": {"name_or_path": f"{w}/model", "dtype": "float32"}, "method": "lora",
            "adapter": {"rank": 8, "dropout": float(os.environ.get("DROPOUT", 0.05))},
            "data": {"path": f"{w}/chat.jsonl", "seq_len": 128},
            "training": {"max_steps": int(os.environ["STEPS"]), "micro_batch_size": 2, "grad_accum": 2,
                         "learning_rate": 2e-3, "warmup_steps": 2, "seed": 1, "kernels": "none",
                         "save_every_steps": int(os.environ["SAVE_EVERY"])},
            "output_dir": f"{w}/runs/{{name}}"}
    yaml.safe_dump(tree, open(f"{w}/{name}.yaml", "w"))
PY
train() { python -m onecard.cli train "$@" --num-gpus 2 --strategy "$STRATEGY" --json; }
train "$W/full.yaml" > "$OUT_DIR/train-full.json" 2> "$OUT_DIR/train-full.err"; RC_FULL=$?
ONECARD_TEST_CRASH_AT_STEP=$CRASH_AT train "$W/resumed.yaml" > "$OUT_DIR/train-killed.json" 2> "$OUT_DIR/train-killed.err"
RC_KILLED=$?
train "$W/resumed.yaml" --resume > "$OUT_DIR/train-resumed.json" 2> "$OUT_DIR/train-resumed.err"; RC_RESUMED=$?
for run in full resumed; do cp "$W/runs/$run/metrics.jsonl" "$OUT_DIR/$run-metrics.jsonl" 2>/dev/null; done
ls -R "$W/runs/resumed/checkpoints" > "$OUT_DIR/resumed-checkpoints.txt" 2>&1
for f in full killed resumed; do [ -s "$OUT_DIR/train-$f.err" ] && tail -n 5 "$OUT_DIR/train-$f.err" | sed "s/^/[$f] /" >&2; done
RC_FULL=$RC_FULL RC_KILLED=$RC_KILLED RC_RESUMED=$RC_RESUMED STRATEGY=$STRATEGY python - "$W" "$OUT_DIR" <<'PY'
import json, os, sys
w, out_dir = sys.argv[1:]
steps, crash = int(os.environ["STEPS"]), int(os.environ["CRASH_AT"])
row = {"strategy": os.environ["STRATEGY"], "cpu": os.environ.get("ONECARD_DISTRIBUTED_CPU") == "1",
       "steps": steps, "crash_at": crash, "rc": {k: int(os.environ[f"RC_{k.upper()}"]) for k in ("full", "killed", "resumed")}}


def metrics(name):
    path = f"{w}/runs/{name}/metrics.jsonl"
    return [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []


def rel(a, b):
    return abs(a - b) / max(abs(a), 1e-12)


def adapter(name):
    from safetensors.torch import load_file
    return load_file(f"{w}/runs/{name}/adapter/adapter_model.safetensors")


try:
    full, resumed = metrics("full"), metrics("resumed")
    row["metric_steps"] = [[r["step"] for r in full], [r["step"] for r in resumed]]
    by_step = {r["step"]: r["loss"] for r in full}
    pairs = [(r["step"], by_step[r["step"]], r["loss"]) for r in resumed if r["step"] in by_step]
    after = [rel(a, b) for s, a, b in pairs if s > crash]
    before = [rel(a, b) for s, a, b in pairs if s <= crash]
    row["max_rel_loss_diff_after_resume"] = max(after) if after else None
    row["max_rel_loss_diff_before_crash"] = max(before) if before else None
    row["last_loss"] = [full[-1]["loss"], resumed[-1]["loss"]] if full and resumed else None
    summary = json.load(open(f"{out_dir}/train-resumed.json")) if os.path.getsize(f"{out_dir}/train-resumed.json") else {}
    row["resumed_from_step"] = summary.get("resumed_from_step")
    row["summary_strategy"] = summary.get("strategy")
except Exception as exc:  # still print a row
    row["metrics_error"] = repr(exc)
try:
    a, b = adapter("full"), adapter("resumed")
    row["adapter_keys"] = [len(a), len(b)]
    common = sorted(set(a) & set(b))
    diffs = [float((a[k].float() - b[k].float()).abs().max()) for k in common if a[k].shape == b[k].shape]
    scale = max(float(a[k].float().abs().max()) for k in common) if common else 0.0
    row["adapter_max_abs_diff"] = max(diffs) if diffs else None
    row["adapter_max_abs"] = scale
    row["adapter_same_keys_shapes"] = set(a) == set(b) and len(diffs) == len(common) > 0
    row["adapter_lora_shapes_ok"] = all(t.dim() == 2 and 8 in t.shape for k, t in a.items() if "lora_" in k)
    row["adapter_lora_b_trained"] = all(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)
except Exception as exc:
    row["adapter_error"] = repr(exc)
after = row.get("max_rel_loss_diff_after_resume")
row["pass_run"] = row["rc"]["full"] == 0 and row["rc"]["killed"] != 0 and row["rc"]["resumed"] == 0 \
    and row.get("resumed_from_step") == crash \
    and row.get("metric_steps") == [list(range(1, steps + 1))] * 2
row["pass_loss"] = after is not None and after < 1e-3
row["pass_adapter"] = bool(row.get("adapter_same_keys_shapes") and row.get("adapter_lora_shapes_ok")
                           and row.get("adapter_lora_b_trained")
                           and row["adapter_max_abs_diff"] <= 1e-3 * max(row["adapter_max_abs"], 1e-12))
row["pass"] = row["pass_run"] and row["pass_loss"] and row["pass_adapter"]
line = json.dumps(row)
print(line)
open(f"{out_dir}/resume.json", "w").write(line + "\n")
sys.exit(0 if row["pass"] else 1)
PY
