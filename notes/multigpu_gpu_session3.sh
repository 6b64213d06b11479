#!/usr/bin/env bash
# Issue 9, third GPU session (2 x H200): where FSDP1's reserved-but-unallocated memory sits, one FSDP variant, a
# held-out shape, and FSDP checkpoint/resume. ONE command, < 8 minutes, every part guarded: a failed or timed-out
# part prints "part X failed rc=N" and the others still write their output.
# Usage (repo root; the caller has run `export PYTHONPATH=$PWD/src:$PWD/.whl-bench/site`, carry [".whl-bench/site"]):
#   OUT=$OUT bash notes/multigpu_gpu_session3.sh
# Writes under $OUT: a3.jsonl (A), resume/ (D), heldout-8b-fsdp.jsonl (C), a3-nolimit.jsonl (B), <part>.log each,
# parts.jsonl (rc and seconds per part), env.txt, summary.txt (the headline numbers of every row).
# Parts: A 70B QLoRA FSDP probe with --memory-snapshot (default allocator and FSDP settings: the A3 rerun);
#        D FSDP checkpoint/resume (notes/multigpu_resume.sh, tiny llama), started in the BACKGROUND alongside A: it
#          needs ~2 GiB per GPU and the probe's memory numbers are per process (each process has its own caching
#          allocator), so only A's step times can be perturbed; SERIAL=1 runs it after A instead;
#        C held-out shape: llama-3-8b LoRA bf16 FSDP probe, seq 2048 x 4, --memory-snapshot;
#        B A with limit_all_gathers off (last: the first part the budget drops).
# Budget: BUDGET_S (430) seconds over the sequential parts; each part's timeout is min(its cap, what is left), and a
# part is skipped when less than its minimum is left (B needs ~140 s: the 70B build alone takes 1-2 min).
set -u
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-430}
START=$SECONDS
unset PYTORCH_CUDA_ALLOC_CONF PYTORCH_ALLOC_CONF  # the default allocator: what A3 measured at 32.96 GiB reserved
export PYTHONUNBUFFERED=1

left() { echo $(( BUDGET_S - (SECONDS - START) )); }

record() {  # name rc seconds
  echo "{\"part\": \"$1\", \"rc\": $2, \"seconds\": $3}" >> "$OUT/parts.jsonl"
  if [ "$2" -eq 0 ]; then echo "part $1 ok after $(( SECONDS - START ))s total"
  else echo "part $1 failed rc=$2 ($3 s)"
    { grep -m 4 -E "(Error|Exception)[: ]" "$OUT/$1.log"; tail -n 6 "$OUT/$1.log"; } 2>/dev/null | sed "s/^/  [$1] /"; fi
}

part() {  # name cap_seconds min_seconds command...: skipped when less than min_seconds of the budget is left
  local name=$1 cap=$2 min=$3 t rc begin; shift 3
  t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt "$min" ]; then
    echo "part $name skipped: ${t}s of budget left"; echo "{\"part\": \"$name\", \"skipped\": true}" >> "$OUT/parts.jsonl"
    return 0
  fi
  echo "== part $name (timeout ${t}s) at $(( SECONDS - START ))s"
  begin=$SECONDS
  timeout -k 10 "$t" "$@" > "$OUT/$name.log" 2>&1; rc=$?
  record "$name" "$rc" $(( SECONDS - begin ))
  return 0
}

# the probe on 2 GPUs under torchrun, as notes/multigpu.md's command forms (an array: timeout runs commands only)
PROBE=(python -m torch.distributed.run --standalone --nproc_per_node 2 -m onecard.train.distributed_probe)

# SESSION_CPU_DRY=1 (this script's CPU check only): D on CPU processes; A-C then fail fast without a GPU.
RESUME=(env ${SESSION_CPU_DRY:+ONECARD_DISTRIBUTED_CPU=1} STRATEGY=fsdp STEPS=8 SAVE_EVERY=4 CRASH_AT=4
        RESUME_WORK=/tmp/session3-resume-work bash notes/multigpu_resume.sh "$OUT/resume")

{ git rev-parse HEAD; git status --short | head -20; nvidia-smi 2>&1 | head -20; python -c \
  "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)"
} > "$OUT/env.txt" 2>&1 || true

D_PID=
if [ -z "${SERIAL:-}" ]; then
  echo "== part D (background, timeout 240s) at $(( SECONDS - START ))s"
  ( begin=$SECONDS; timeout -k 10 240 "${RESUME[@]}" > "$OUT/D.log" 2>&1; rc=$?; record D "$rc" $(( SECONDS - begin )) ) &
  D_PID=$!
fi

part A 210 60 "${PROBE[@]}" --out "$OUT/a3.jsonl" --model llama-3-70b --method qlora --strategy fsdp --seq 2048 --batch 1 --steps 4 \
  --memory-snapshot
if [ -n "${SERIAL:-}" ]; then part D 150 60 "${RESUME[@]}"; fi
part C 150 60 "${PROBE[@]}" --out "$OUT/heldout-8b-fsdp.jsonl" --model llama-3-8b --method lora --strategy fsdp --seq 2048 --batch 4 \
  --steps 3 --memory-snapshot
part B 210 140 "${PROBE[@]}" --out "$OUT/a3-nolimit.jsonl" --model llama-3-70b --method qlora --strategy fsdp --seq 2048 --batch 1 \
  --steps 4 --memory-snapshot --no-limit-all-gathers
if [ -n "$D_PID" ]; then wait "$D_PID" || echo "part D wait rc=$?"; fi

python - "$OUT" > "$OUT/summary.txt" 2>&1 <<'PY' || echo "summary failed rc=$?"
import json, os, sys
out = sys.argv[1]
for name in ("a3.jsonl", "a3-nolimit.jsonl", "heldout-8b-fsdp.jsonl"):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        print(name, "missing")
        continue
    for line in open(path):
        try:
            r = json.loads(line)
            snap = r.get("memory_snapshot", {}).get("total", {})
            print(name, "rank", r.get("rank"), r.get("variant"),
                  "reserved %.2f allocated %.2f plan %.2f vs_plan %.3f" % (
                      r["peak_reserved_gib"], r["peak_allocated_gib"], r["predicted_reserved_gib"], r["peak_vs_plan"]),
                  "weights %.2f->%.2f" % (r["weights_gib_before_wrap"], r["weights_gib_after_wrap"]),
                  "s/step", [round(s, 2) for s in r["s_per_step"]])
            print("   end snapshot GiB:", r.get("memory_snapshot_gib"))
            print("   inactive hist:", {k: round(v["bytes"] / 2**30, 3) for k, v in snap.get("inactive_hist", {}).items()},
                  "idle segments", snap.get("idle_segments"), "largest inactive %.3f GiB" % (snap.get("largest_inactive_bytes", 0) / 2**30))
            peak = r.get("memory_snapshot_at_peak") or {}
            print("   peak sample:", peak.get("where"), "reserved %.2f" % (peak.get("reserved_gib") or 0),
                  "allocator:", r.get("allocator_stats"))
        except Exception as exc:  # a malformed row must not hide the others
            print(name, "unreadable row:", repr(exc))
p = os.path.join(out, "resume", "resume.json")
print("resume:", open(p).read().strip() if os.path.exists(p) else "missing")
PY
cat "$OUT/summary.txt"; cat "$OUT/parts.jsonl"
echo "session3 done in $(( SECONDS - START ))s"
