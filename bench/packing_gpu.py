"""GPU measurement of packed SFT rows: transformers' dense block-diagonal mask vs onecard's varlen path.

Run on the GPU machine from the repo root (one call, well under 90 s for 32 layers on an H200):
    PYTHONPATH=src:<site dir with pydantic> python bench/packing_gpu.py [--layers N]
Prints a table and writes $OUT/packing_gpu.json.

Setup: the Llama 3 8B preset built by onecard's bench builder (random bf16 weights on the GPU,
src/onecard/bench/build.py), LoRA r16 on all 7 projections via peft, onecard kernels, checkpointing,
as ``onecard bench`` sets them up. Batch: 8 rows of 2048 tokens packed greedily in order
(onecard.data.packing) from examples of uniform random length 64..1024 (seed 0), collated as training
does (no attention_mask, position_ids restarting per example). Both settings run in one process on one
model: "dense" forces onecard.patch.packed's dispatch off (transformers' sdpa with the block-diagonal
bool mask), "varlen" leaves it on (torch.nn.attention.varlen.varlen_attn). The LoRA weights are restored
between them, so their step-0 losses must agree (bf16).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

OUT = os.environ.get("OUT", "bench_out")
SEQ, MICRO_BATCH, WARMUP, TIMED = 2048, 8, 2, 3
MIN_LEN, MAX_LEN, SEED = 64, 1024, 0


def packed_batch(vocab_size: int, device: str) -> tuple[dict, dict]:
    """MICRO_BATCH packed rows from random-length examples (fixed seed), as training collates them;
    and what they hold."""
    from onecard.data.collate import collate, model_inputs
    from onecard.data.packing import pack_examples

    gen = torch.Generator().manual_seed(SEED)
    examples, rows = [], []
    while len(rows) <= MICRO_BATCH:  # one row more than needed: the last row is not full yet
        n = int(torch.randint(MIN_LEN, MAX_LEN + 1, (1,), generator=gen))
        ids = torch.randint(0, vocab_size, (n,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": list(ids)})
        rows = pack_examples(examples, SEQ)
    rows = rows[:MICRO_BATCH]
    batch = collate(rows, pad_id=0)
    inputs = model_inputs(batch) | {"labels": batch["labels"]}
    lengths = [len(ex["input_ids"]) for ex in examples[: sum(r["position_ids"].count(0) for r in rows)]]
    stats = {"row_tokens": batch["input_ids"].shape[1], "examples": len(lengths), "longest_example": max(lengths), "example_tokens": sum(lengths),
             "padding_fraction": 1 - sum(lengths) / batch["input_ids"].numel()}
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}, stats


def run_setting(model, batch, example_tokens: int, label: str, varlen: bool, adapters: dict) -> dict:
    from onecard.bench.step import build_optimizer, free_cuda, peak_memory
    from onecard.kernels import packing
    from onecard.patch import packed

    with torch.no_grad():  # same starting adapters for both settings
        for name, p in model.named_parameters():
            if name in adapters:
                p.copy_(adapters[name])
    calls = [0]
    real_varlen = packing.packed_varlen_attention

    def counted(*args, **kwargs):
        calls[0] += 1
        return real_varlen(*args, **kwargs)

    supported = packed.tensors_supported
    packing.packed_varlen_attention = counted
    packed.tensors_supported = supported if varlen else (lambda q: False)
    free_cuda()
    optimizer = build_optimizer(model, "cuda")
    losses, times, computations0 = [], [], packed.computations
    try:
        for _ in range(WARMUP + TIMED):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    finally:
        packing.packed_varlen_attention = real_varlen
        packed.tensors_supported = supported
    steps = WARMUP + TIMED
    step_s = sum(times[WARMUP:]) / TIMED
    tokens = batch["input_ids"].numel()
    del optimizer
    return {"label": label, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "example_tokens_per_s": example_tokens / step_s, "losses": losses,
            "varlen_calls_per_step": calls[0] / steps, "packed_info_computations_per_step":
            (packed.computations - computations0) / steps, **peak_memory("cuda")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the preset's 32")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    from onecard.bench.build import build_model
    from onecard.bench.config import BenchConfig
    from onecard.bench.run import apply_kernels, versions

    if args.layers:  # a shallower Llama 3 8B: the bench builder reads the preset, so shrink the config it makes
        import onecard.bench.build as build

        full_config = build.hf_config
        build.hf_config = lambda cfg: _with_layers(full_config(cfg), args.layers)
    cfg = BenchConfig(model="llama-3-8b", method="lora", seq=SEQ, micro_batch=MICRO_BATCH, rank=16, grad_ckpt=True,
                      kernels="onecard")
    t0 = time.perf_counter()
    model, vocab = build_model(cfg, "cuda")
    kernels = apply_kernels(model, "onecard")
    build_s = time.perf_counter() - t0
    batch, stats = packed_batch(vocab, "cuda")
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    results = [run_setting(model, batch, stats["example_tokens"], "dense block-diagonal mask (sdpa)", False, adapters)]
    print(results[-1], flush=True)
    results.append(run_setting(model, batch, stats["example_tokens"], "varlen_attn (onecard.patch.packed)", True, adapters))
    print(results[-1], flush=True)
    dense, varlen = results
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "PYTHONPATH=src python " + " ".join(sys.argv), "versions": versions(),
        "model": "llama-3-8b preset, random bf16 weights", "layers": model.config.num_hidden_layers,
        "lora": "r16 on all 7 projections, onecard.train.model.apply_adapter with the recipe defaults",
        "grad_ckpt": True, "seq": SEQ, "micro_batch": MICRO_BATCH, "warmup": WARMUP, "timed": TIMED,
        "example_lengths": f"uniform {MIN_LEN}..{MAX_LEN}, seed {SEED}, packed in order",
        **stats, "build_s": build_s, "kernels": kernels, "results": results,
        "step0_loss_rel_diff": abs(varlen["losses"][0] - dense["losses"][0]) / abs(dense["losses"][0]),
        "speedup_varlen_over_dense": varlen["tokens_per_s"] / dense["tokens_per_s"],
    }
    if args.layers:
        record["note"] = f"{args.layers} of the preset's 32 layers, to fit the time limit"
    with open(os.path.join(OUT, "packing_gpu.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"\n{'setting':38s} {'tokens/s':>9s} {'x dense':>8s} {'reserved GiB':>13s} {'loss0':>8s} {'varlen/step':>12s}")
    for r in results:
        print(f"{r['label']:38s} {r['tokens_per_s']:9,.0f} {r['tokens_per_s'] / dense['tokens_per_s']:8.2f} "
              f"{r['peak_reserved_gib']:13.1f} {r['losses'][0]:8.4f} {r['varlen_calls_per_step']:12.0f}")
    print(f"step-0 loss relative difference {record['step0_loss_rel_diff']:.2e}; "
          f"{record['examples']} examples, longest {record['longest_example']}")


def _with_layers(config, layers: int):
    config.num_hidden_layers = layers
    return config


if __name__ == "__main__":
    main()
