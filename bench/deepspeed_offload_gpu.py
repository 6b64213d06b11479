"""DeepSpeed ZeRO-3 parameter offload (ZeRO-Offload / Infinity to CPU) for LoRA and QLoRA on a random Llama 3 8B.

The other existing engine the streaming design is measured against (accelerate's dispatch_model offload:
bench/accelerate_offload_gpu.py). One process, world size 1, ZeRO stage 3 with ``offload_param: cpu`` (pinned),
bf16, the client's torch AdamW on the adapter (so no DeepSpeed C++ op is built), gradient checkpointing
(use_reentrant=False), seq 2048, micro-batch 1, 1 warm-up + 3 timed steps. Variants:
  lora:  the bf16 base built on the GPU, moved to the host, peft LoRA r16 on 7 projections, deepspeed.initialize;
  qlora: the same with bitsandbytes NF4 linears stored as bf16 (``bnb_4bit_quant_storage``, what ZeRO-3 needs to
         partition them), built one layer at a time (onecard.bench.build.build_nf4_layerwise).
Per variant: status and where it failed, tokens/s, peak reserved GiB, and how many lora_B tensors moved from their
zero init after training (read with deepspeed.utils.safe_get_full_fp32_param), so a run that trains nothing shows.

GPU:  PYTHONPATH=src:.whl/site python3 bench/deepspeed_offload_gpu.py          -> $OUT/deepspeed_offload.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accelerate_offload_gpu import GIB, apply_lora, build, setup_ckpt  # noqa: E402


def ds_config(micro_batch: int) -> dict:
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                                  "overlap_comm": True, "contiguous_gradients": True,
                                  "stage3_prefetch_bucket_size": 5e8, "stage3_max_live_parameters": 1e9,
                                  "stage3_param_persistence_threshold": 1e5},
            "wall_clock_breakdown": False}


def base_model(variant: str):
    if variant == "lora":
        return build(False, "cuda")[0]
    from onecard.bench.build import build_nf4_layerwise, hf_config
    from onecard.bench.config import BenchConfig

    config = hf_config(BenchConfig(model="llama-3-8b", method="qlora"))
    config.use_cache = False
    model = build_nf4_layerwise(config, "cuda", quant_storage=torch.bfloat16)
    return model


def lora_b_moved(engine) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    moved = total = 0
    for name, p in engine.module.named_parameters():
        if p.requires_grad and "lora_B" in name:
            total += 1
            full = safe_get_full_fp32_param(p)
            moved += int(full is not None and float(full.abs().max()) > 0)
    return {"lora_B_tensors": total, "moved_from_zero": moved}


def run_variant(variant: str, seq: int, steps: int) -> dict:
    import deepspeed

    res: dict = {"variant": variant, "status": "error", "stage": "build"}
    engine = model = None
    try:
        t0 = time.perf_counter()
        model = base_model(variant)
        res["build_s"] = time.perf_counter() - t0
        res["stage"] = "get_peft_model"
        model = apply_lora(model)
        setup_ckpt(model)
        model.train()
        vocab = model.config.vocab_size
        params = [p for p in model.parameters() if p.requires_grad]
        res["stage"] = "deepspeed.initialize"
        gc.collect()
        torch.cuda.empty_cache()
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-4),
                                          config=ds_config(1))
        res["gpu_allocated_gib_after_initialize"] = torch.cuda.memory_allocated() / GIB
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gen = torch.Generator().manual_seed(0)
        times, losses = [], []
        for step in range(steps):
            ids = torch.randint(0, vocab, (1, seq), generator=gen).cuda()
            torch.cuda.synchronize()
            t = time.perf_counter()
            res["stage"] = f"forward step {step}"
            loss = engine(input_ids=ids, labels=ids).loss
            res["stage"] = f"backward step {step}"
            engine.backward(loss)
            res["stage"] = f"optimizer step {step}"
            engine.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            losses.append(float(loss.detach()))
            print(f"  {variant} step {step}: {times[-1]:.3f} s loss {losses[-1]:.4f}", flush=True)
        timed = times[1:]
        res.update(stage="done", status="ok", step_s=times, losses=losses,
                   tokens_per_s=seq * len(timed) / sum(timed),
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                   peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB, **lora_b_moved(engine))
    except Exception as exc:  # a failure is the result: record what and where
        res.update(error_type=type(exc).__name__, error=str(exc)[:2000], traceback_tail=traceback.format_exc()[-3000:])
        print(f"  {variant} failed at {res['stage']}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    finally:
        res.setdefault("peak_reserved_gib", torch.cuda.max_memory_reserved() / GIB)
        if engine is not None:
            engine.destroy()
        del engine, model
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return res


def versions() -> dict:
    import accelerate
    import bitsandbytes
    import deepspeed
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__, "deepspeed": deepspeed.__version__,
            "bitsandbytes": bitsandbytes.__version__, "gpu": torch.cuda.get_device_name(0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4, help="1 warm-up + the rest timed")
    ap.add_argument("--variants", default="lora,qlora")
    args = ap.parse_args()
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                       ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), "model": "llama-3-8b (random)", "seq": args.seq, "micro_batch": 1,
              "steps": args.steps, "timed_steps": args.steps - 1, "config": ds_config(1),
              "method": "lora r16 q,k,v,o,gate,up,down; grad ckpt use_reentrant=False; torch AdamW (client)",
              "reference": "onecard weight streaming, same shape: bench/results/h200-s18.jsonl", "variants": []}
    path = os.path.join(os.environ.get("OUT") or tempfile.mkdtemp(), "deepspeed_offload.json")
    for variant in args.variants.split(","):
        print(f"== {variant}", flush=True)
        report["variants"].append(run_variant(variant, args.seq, args.steps))
        with open(path, "w") as f:  # after each variant: nothing lost if the call is cut short
            json.dump(report, f, indent=1)
    for v in report["variants"]:
        print(json.dumps({k: v.get(k) for k in ("variant", "status", "stage", "error_type", "error", "tokens_per_s",
                                                "peak_reserved_gib", "moved_from_zero", "lora_B_tensors")})[:1500])
    print("wrote", path)


if __name__ == "__main__":
    main()
