#!/bin/bash
# Issue 9, session 3 (2 x H200): the parity script (notes/multigpu_parity.sh, 1 GPU vs 2 GPUs, same global batch)
# under FSDP for full fine-tuning and DoRA, and with kernels auto (onecard turns them off under FSDP with a notice).
# Repo root, PYTHONPATH with src and .whl-bench/site. Writes $OUT/methods/<variant>/ and prints one line per variant.
OUT=${OUT:-/tmp/out}
for v in "full none" "dora none" "lora auto"; do
  set -- $v
  d=$OUT/methods/$1-kernels-$2; mkdir -p $d
  STEPS=${STEPS:-20} STRATEGY=fsdp METHOD=$1 KERNELS=$2 timeout ${PART_S:-85} bash notes/multigpu_parity.sh $d > $d/log 2>&1
  echo "$1 kernels=$2 rc=$? $(tail -n 1 $d/log)"
  grep -m1 -o "onecard's kernels are off under FSDP[^;]*" $d/log || true
done
