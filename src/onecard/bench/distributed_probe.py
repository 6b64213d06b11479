"""Multi-GPU speed and per-GPU memory (GPU only): training steps of a preset shape, random weights, N GPUs.

Its rows: bench/results/h200x2-multigpu.jsonl.

Acceptance 3 (default): QLoRA with random NF4 weights under FSDP2. Acceptance 2: ``--method lora --strategy ddp``
(bf16 random base from onecard.bench.build), run once as plain ``python -m`` (1 GPU) and once under torchrun.

Run under torchrun, one process per GPU (commands in notes/multigpu.md):
    python -m torch.distributed.run --nproc_per_node 2 -m onecard.bench.distributed_probe --model llama-3-70b
Each rank builds the model as onecard.bench.build does (meta skeleton, one bf16 layer at a time on the GPU,
quantised to NF4) but with ``quant_storage=bfloat16``, the storage FSDP2 shards; wraps it exactly as
``onecard train --num-gpus N --strategy fsdp`` does (distributed.prepare); runs ``--steps`` optimizer steps on
random tokens; and writes one JSON line per rank: the weight bytes on this GPU before and after sharding, the peak
reserved memory of the steps, and the planner's per-GPU prediction for the same recipe with ``num_gpus=N``.
Peak statistics are reset after wrapping: the build holds the whole NF4 model on every rank first (a transient the
planner does not model; see notes/multigpu.md).

Where reserved-but-unallocated memory sits (``--memory-snapshot``): per-stream summaries of
``torch.cuda.memory_snapshot()`` (onecard.bench.memory_snapshot) at the end of the steps and at the sample with the
highest reserved memory. FSDP variants without code edits on the device: ``--no-limit-all-gathers``,
``--forward-prefetch``, ``--backward-prefetch pre|post|none``; the row records the plugin's settings as used.
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
    ap.add_argument("--memory-snapshot", action="store_true",
                    help="record per-stream allocator snapshot summaries (end of the steps and at peak reserved)")
    ap.add_argument("--no-limit-all-gathers", action="store_true", help="FSDP limit_all_gathers=False")
    ap.add_argument("--forward-prefetch", action="store_true", help="FSDP forward_prefetch=True")
    ap.add_argument("--backward-prefetch", default=None, choices=["none", "pre", "post"],
                    help="FSDP backward_prefetch (accelerate's default is none; torch FSDP's own is pre)")
    ap.add_argument("--memory-cap-gib", type=float, default=None,
                    help="emulate a card of this size on each GPU (train/memory_cap.py), before the build")
    args = ap.parse_args(argv)
    os.environ[D.STRATEGY_ENV] = args.strategy
    cfg, recipe = probe_recipe(args.model, args.method, args.seq, args.batch, args.rank, D.world_size())
    dist = D.init(recipe)
    if args.memory_cap_gib is not None:
        from onecard.train.memory_cap import apply_memory_cap

        apply_memory_cap(args.memory_cap_gib)  # this rank's GPU: accelerate made it the current device
    fsdp_settings = _fsdp_variant(dist, args)
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
    from onecard.train.optim import build_optimizer

    model, optimizer = D.prepare(dist, model, build_optimizer(model, recipe, dist.device), recipe)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    after = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    row = {"rank": dist.rank, "world": dist.world, "model": args.model, "method": args.method,
           "strategy": dist.strategy, "seq": args.seq, "batch": args.batch, "command": " ".join(sys.argv),
           "weights_gib_before_wrap": before / GIB, "weights_gib_after_wrap": after / GIB,
           "alloc_conf": {k: os.environ.get(k) for k in D.ALLOC_CONF_ENVS if os.environ.get(k)},
           "lora_rank": args.rank, "versions": bench_versions(), "fsdp_settings": fsdp_settings,
           "variant": _variant_name(args), "memory_cap_gib": args.memory_cap_gib}
    row.update(_steps(dist, model, optimizer, cfg, args.steps, args.memory_snapshot))
    row["allocator_stats"] = _allocator_stats()
    row.update(plan_prediction(recipe, dist.strategy))
    row["peak_vs_plan"] = row["peak_reserved_gib"] / row["predicted_reserved_gib"]
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    dist.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def probe_recipe(model: str, method: str, seq: int, batch: int, lora_rank: int, world: int):
    """The bench config and validated recipe a probe of this shape trains (pure: the report recomputes the planner's
    figure for a recorded row with it, so a planner change is judged against old measurements)."""
    from onecard.bench.config import BenchConfig
    from onecard.recipe import validate_recipe

    cfg = BenchConfig(model=model, method=method, seq=seq, micro_batch=batch, rank=lora_rank, grad_ckpt=True,
                      kernels="none")
    tree = cfg.recipe_tree()
    tree["training"].update(num_gpus=world, weight_decay=0.0)
    return cfg, validate_recipe(tree)


def _variant_name(args) -> str:
    parts = (["no-limit-all-gathers"] if args.no_limit_all_gathers else []) + \
        (["forward-prefetch"] if args.forward_prefetch else []) + \
        ([f"backward-prefetch-{args.backward_prefetch}"] if args.backward_prefetch else [])
    return "+".join(parts) or "default"


def _fsdp_variant(dist, args) -> dict | None:
    """The FSDP settings of the row. The three variant flags were FSDP1's (the all-gather stream's rate limit and
    prefetch order, rows of bench/results/h200x2-multigpu.jsonl); onecard's FSDP is FSDP2 now, which has neither
    knob in accelerate's plugin, so they are refused rather than silently ignored. None under DDP."""
    plugin = getattr(dist.accelerator.state, "fsdp_plugin", None)
    if dist.strategy != "fsdp" or plugin is None:
        return None
    if args.no_limit_all_gathers or args.forward_prefetch or args.backward_prefetch:
        raise SystemExit("--no-limit-all-gathers, --forward-prefetch and --backward-prefetch are FSDP1 settings; "
                         "onecard's FSDP is FSDP2 (train/distributed.py fsdp_plugin)")
    return {"fsdp_version": int(plugin.fsdp_version), "reshard_after_forward": bool(plugin.reshard_after_forward),
            "cpu_ram_efficient_loading": bool(plugin.cpu_ram_efficient_loading)}


class PeakSnapshot:
    """Keeps the snapshot summary taken when reserved memory was highest over the samples (the first time it
    reached that value). A snapshot is taken only when reserved grew, so steady steps cost one counter read.

    Reserved memory never shrinks unless ``empty_cache`` runs (or the allocator frees its cache to retry a failed
    allocation, counted in ``num_alloc_retries``), so the end-of-run snapshot already lists every segment that was
    reserved at the peak; what the peak sample adds is which blocks were *allocated* at that moment. Samples sit
    between phases (after backward, after the optimizer step), so a transient inside backward is seen only by the
    segments it left reserved."""

    def __init__(self, reserved_bytes, snapshot, device: int | None):
        self._reserved, self._snapshot, self._device = reserved_bytes, snapshot, device
        self.reserved_bytes, self.where, self.summary, self.samples = -1, None, None, 0

    def sample(self, where: str) -> None:
        from onecard.bench.memory_snapshot import summarize_snapshot

        self.samples += 1
        reserved = int(self._reserved())
        if reserved > self.reserved_bytes:
            self.reserved_bytes, self.where = reserved, where
            self.summary = summarize_snapshot(self._snapshot(), device=self._device)


def _allocator_stats() -> dict:
    """The caching allocator's own counters that bear on fragmentation (torch.cuda.memory_stats keys)."""
    import torch

    stats = torch.cuda.memory_stats()
    keys = ("num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free", "segment.all.peak",
            "inactive_split.all.peak", "inactive_split_bytes.all.peak", "inactive_split_bytes.all.current",
            "reserved_bytes.large_pool.peak", "reserved_bytes.small_pool.peak", "allocated_bytes.all.peak",
            "reserved_bytes.all.peak")
    return {k: stats[k] for k in keys if k in stats}


def _steps(dist, model, optimizer, cfg, steps: int, memory_snapshot: bool = False) -> dict:
    import time

    import torch

    from onecard.bench.step import random_batch
    from onecard.train.sft_step import token_ce_sum
    from onecard.bench.build import hf_config

    batch = random_batch(int(hf_config(cfg).vocab_size), cfg.micro_batch, cfg.seq, dist.device, seed=dist.rank)
    model.train()
    losses, times = [], []
    device_index = torch.device(dist.device).index  # this rank's GPU (a snapshot lists every device touched)
    keeper = PeakSnapshot(lambda: torch.cuda.memory_reserved(device_index), torch.cuda.memory_snapshot,
                          device_index) if memory_snapshot else None
    snapshot_s = 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        loss_sum, n = token_ce_sum(model(input_ids=batch["input_ids"], use_cache=False).logits, batch["labels"])
        (loss_sum / n).backward()
        snapshot_s += _sample(keeper, f"step{step}.backward")
        dist.clip_grad_norm_(model, 1.0)  # FSDP: the all-rank norm, as onecard train clips
        optimizer.step()
        snapshot_s += _sample(keeper, f"step{step}.optimizer")
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum.detach()) / n)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = sorted(times[1:] or times)  # the first step allocates optimizer state and picks kernels
    tokens = cfg.micro_batch * cfg.seq * dist.world
    out = {"losses": losses, "s_per_step": times, "tokens_per_s_all_gpus": tokens / timed[len(timed) // 2],
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB}
    if keeper is not None:
        out.update(_snapshot_fields(keeper, snapshot_s, device_index))
    return out


def _sample(keeper, where: str) -> float:
    """Seconds spent sampling (inside the timed steps: the row says how much)."""
    import time

    if keeper is None:
        return 0.0
    start = time.perf_counter()
    keeper.sample(where)
    return time.perf_counter() - start


def _snapshot_fields(keeper, snapshot_s: float, device_index: int) -> dict:
    import torch

    from onecard.bench.memory_snapshot import gib_view, summarize_snapshot

    end = summarize_snapshot(torch.cuda.memory_snapshot(), device=device_index)
    return {"memory_snapshot": end, "memory_snapshot_gib": gib_view(end),
            "memory_snapshot_at_peak": {"where": keeper.where, "reserved_gib": keeper.reserved_bytes / GIB,
                                        "samples": keeper.samples, "summary": keeper.summary},
            "memory_snapshot_s_in_steps": snapshot_s}


def plan_prediction(recipe, strategy: str) -> dict:
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
