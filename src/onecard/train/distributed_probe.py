"""Issue 9 acceptances 2 and 3 (GPU only): training steps of a preset shape, random weights, N GPUs.

First run on 2 x H200 on 2026-11-28: bench/results/h200x2-multigpu.jsonl.

Acceptance 3 (default): QLoRA with random NF4 weights under FSDP1. Acceptance 2: ``--method lora --strategy ddp``
(bf16 random base from onecard.bench.build), run once as plain ``python -m`` (1 GPU) and once under torchrun.

Run under torchrun, one process per GPU (commands in notes/multigpu.md):
    python -m torch.distributed.run --nproc_per_node 2 -m onecard.train.distributed_probe --model llama-3-70b
Each rank builds the model as onecard.bench.build does (meta skeleton, one bf16 layer at a time on the GPU,
quantised to NF4) but with ``quant_storage=bfloat16``, the storage FSDP1 can flatten and shard; wraps it exactly as
``onecard train --num-gpus N --strategy fsdp`` does (distributed.prepare_model); runs ``--steps`` optimizer steps on
random tokens; and writes one JSON line per rank: the weight bytes on this GPU before and after sharding, the peak
reserved memory of the steps, and the planner's per-GPU prediction for the same recipe with ``num_gpus=N``.
Peak statistics are reset after wrapping: the build holds the whole NF4 model on every rank first (a transient the
planner does not model; see notes/multigpu.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

GIB = 2**30


def build_nf4(cfg, device: str):
    """The bench's layer-by-layer random NF4 build, with bf16 quant storage (FSDP-shardable)."""
    import torch

    from onecard.bench.build import build_nf4_layerwise, hf_config

    return build_nf4_layerwise(hf_config(cfg), device, quant_storage=torch.bfloat16)


def main(argv: list[str] | None = None) -> None:
    import torch

    from onecard.bench.config import BenchConfig
    from onecard.bench.run import versions as bench_versions  # the same record onecard bench rows carry
    from onecard.train import distributed as D

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--method", default="qlora", choices=["qlora", "lora"], help="lora: bf16 random base (bench)")
    ap.add_argument("--strategy", default="fsdp", choices=["fsdp", "ddp"])
    ap.add_argument("--out", default=None, help="append one JSON line per rank here")
    args = ap.parse_args(argv)
    os.environ[D.STRATEGY_ENV] = args.strategy
    cfg = BenchConfig(model=args.model, method=args.method, seq=args.seq, micro_batch=args.batch, rank=args.rank,
                      grad_ckpt=True, kernels="none")
    tree = cfg.recipe_tree()
    tree["training"].update(num_gpus=D.world_size(), weight_decay=0.0)
    from onecard.recipe import validate_recipe

    recipe = validate_recipe(tree)
    dist = D.init(recipe)
    if args.method == "qlora":
        model = build_nf4(cfg, dist.device)
    else:
        from onecard.bench.build import build_base

        model = build_base(cfg, dist.device)
    from onecard.train.model import apply_adapter, enable_grad_ckpt

    torch.manual_seed(0)
    model = apply_adapter(model, recipe)
    enable_grad_ckpt(model, recipe)
    before = torch.cuda.memory_allocated()
    model = D.prepare_model(dist, model, recipe)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    after = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    row = {"rank": dist.rank, "world": dist.world, "model": args.model, "method": args.method,
           "strategy": dist.strategy, "seq": args.seq, "batch": args.batch, "command": " ".join(sys.argv),
           "weights_gib_before_wrap": before / GIB, "weights_gib_after_wrap": after / GIB,
           "alloc_conf": {k: os.environ.get(k) for k in D.ALLOC_CONF_ENVS if os.environ.get(k)},
           "versions": bench_versions()}
    row.update(_steps(dist, model, recipe, cfg, args.steps))
    row.update(_prediction(recipe, dist.strategy))
    row["peak_vs_plan"] = row["peak_reserved_gib"] / row["predicted_reserved_gib"]
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    dist.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _steps(dist, model, recipe, cfg, steps: int) -> dict:
    import time

    import torch

    from onecard.bench.step import random_batch
    from onecard.train.loop import token_ce_sum
    from onecard.train.optim import build_optimizer

    optimizer = build_optimizer(model, recipe, dist.device)
    from onecard.bench.build import hf_config

    batch = random_batch(int(hf_config(cfg).vocab_size), cfg.micro_batch, cfg.seq, dist.device, seed=dist.rank)
    model.train()
    losses, times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss_sum, n = token_ce_sum(model(input_ids=batch["input_ids"], use_cache=False).logits, batch["labels"])
        (loss_sum / n).backward()
        dist.clip_grad_norm_(model, 1.0)  # FSDP: the all-rank norm, as onecard train clips
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum.detach()) / n)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = sorted(times[1:] or times)  # the first step allocates optimizer state and picks kernels
    tokens = cfg.micro_batch * cfg.seq * dist.world
    return {"losses": losses, "s_per_step": times, "tokens_per_s_all_gpus": tokens / timed[len(timed) // 2],
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB}


def _prediction(recipe, strategy: str) -> dict:
    """The planner's per-GPU figures. Its ``num_gpus`` always means FSDP (weights divided); DDP replicates the
    model, so a DDP rank is compared with the one-GPU plan (the first 2 x H200 rows compared it with the split)."""
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import plan_memory

    planned_gpus = recipe.training.num_gpus if strategy == "fsdp" else 1
    plan = plan_memory(inputs_from_recipe(recipe).with_(num_gpus=planned_gpus))
    weights = plan.component("weights")
    return {"predicted_reserved_gib": plan.allocator_bytes / GIB, "predicted_weights_gib": weights.gib,
            "predicted_verdict": plan.verdict, "plan_gpu": recipe.plan.gpu, "planned_num_gpus": planned_gpus}


if __name__ == "__main__":
    main(sys.argv[1:])
