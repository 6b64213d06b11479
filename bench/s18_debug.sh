#!/usr/bin/env bash
# Weight streaming (patch/stream_weights.py) on the H200: the CUDA test, then Llama 3 8B LoRA and QLoRA, seq 2048,
# micro-batch 1, onecard kernels, under a 24 GiB cap, with and without streamed weights (8 resident layers).
# Run from the worktree root on the GPU machine; writes $OUT/log and $OUT/s18.jsonl.
set -o pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee $OUT/log
python -c "import torch,transformers,peft,bitsandbytes;print(torch.__version__,transformers.__version__,peft.__version__,bitsandbytes.__version__)" 2>&1 | tee -a $OUT/log
timeout 50 python -m pytest -q -x -p no:cacheprovider tests/test_stream_weights.py -k cuda 2>&1 | tail -8 | tee -a $OUT/log
B="python -m onecard.cli bench --kernels onecard --seq 2048 --batch 1 --steps 3 --warmup 1 --memory-cap-gib 24 --json --out $OUT/s18.jsonl"
summ() { python -c "
import json,sys
for l in open('$OUT/s18.jsonl'):
    d=json.loads(l)
print({k:d.get(k) for k in ('label','status','error','tokens_per_s','peak_reserved_gib','peak_allocated_gib','streamed_layers','stream_copies','stream_on_demand','stream_hits','build_s')})" 2>&1 | tee -a $OUT/log; }
timeout 35 $B --model llama-3-8b --method lora > /dev/null 2>>$OUT/log; summ
timeout 45 $B --model llama-3-8b --method lora --offload-weights --resident-layers 8 > /dev/null 2>>$OUT/log; summ
timeout 45 $B --model llama-3-8b --method qlora --offload-weights --resident-layers 8 > /dev/null 2>>$OUT/log; summ
timeout 35 $B --model llama-3-8b --method qlora > /dev/null 2>>$OUT/log; summ
