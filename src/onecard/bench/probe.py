"""Probe: a few measured steps per candidate setting, the fastest one that fits (``onecard bench RECIPE --probe``).

The planner ranks the candidates and prunes the ones it expects not to fit (with a 10% margin: the memory matrix
holds it within 10%); then each survivor is *measured* at the longest sequence of the user's data, fastest
expected first, and an OOM ends that candidate (the cap is the card, or ``--memory-cap-gib``). The answer is
printed as ``--set`` overrides. Candidates: micro-batch (powers of two up to 16), checkpointing (none, offloaded to
host memory, on the GPU), fused kernels (fused cross-entropy) on/off, and -- for a setting that does not fit the card,
unless the recipe says ``training.offload_weights: false`` -- the same with its base weights streamed, after all the
rest. Offloaded checkpoints come before checkpoints
kept on the GPU: they hold less, and with onecard's kernels they also recompute less (patch/blocks.py; measured
13,200 vs 12,906 tokens/s on Llama 3 8B b8, bench/results/h200-k10.jsonl).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from onecard.bench.config import BenchConfig, config_from_recipe

GIB = 2**30
MICRO_BATCHES = (1, 2, 4, 8, 16)
PLAN_MARGIN = 1.10
SATURATION = 1.03
PLAN_SLOWER = 0.75
# (grad_ckpt, offload_activations), in the order a line is tried: no recompute, offloaded, on the GPU
CHECKPOINTING = ((False, False), (True, True), (True, False))


def longest_sequence(recipe) -> int:
    """Tokens in the longest training example (capped at data.seq_len); seq_len when the data cannot be read here."""
    if not recipe.data.path:
        return recipe.data.seq_len
    try:
        from transformers import AutoTokenizer

        from onecard.data import build_dataset
        from onecard.train.model import resolve_source

        tokenizer = AutoTokenizer.from_pretrained(resolve_source(recipe))
        data = build_dataset(recipe, tokenizer, "train")
        from onecard.data.store import row_lengths

        return max(row_lengths(data.examples), default=recipe.data.seq_len)
    except Exception:  # noqa: BLE001 -- a preset has no tokenizer: plan at seq_len
        return recipe.data.seq_len


def planned_tokens_per_s(cfg: BenchConfig) -> float:
    """The planner's tokens/s for ``cfg`` on ``cfg.gpu``, the copies of streamed weights included."""
    from onecard.bench.predict import speed

    return speed(cfg)["predicted_tokens_per_s"] or 0.0


def candidates(base: BenchConfig, cap_gib: float, gpu: str, stream: bool = True) -> list[tuple[BenchConfig, float]]:
    """(config, planned GiB) of every setting the planner expects to fit under ``cap_gib``, and with ``stream`` the
    streamed-weights ones; within each line (checkpointing, kernels, streaming) smallest micro-batch first, so the
    first OOM ends the line."""
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import plan_memory

    out = []
    for kernels in ("onecard", "none"):
        for grad_ckpt, offload in CHECKPOINTING:
            for mb in MICRO_BATCHES:
                # a recipe's training.cuda_graph holds where a graph can record the step (bench/config.py)
                graph = base.cuda_graph and kernels == "onecard" and not offload
                cfg = dataclasses.replace(base, micro_batch=mb, grad_ckpt=grad_ckpt, offload_activations=offload,
                                          kernels=kernels, baseline=False, offload_weights=False,
                                          uncheckpointed_layers=0, cuda_graph=graph)
                inp = inputs_from_recipe(cfg.to_recipe(), gpu=gpu)
                planned = plan_memory(inp).required_bytes / GIB
                if planned <= cap_gib * PLAN_MARGIN:
                    out.append((cfg, planned))
                    if grad_ckpt:
                        out += _partly_checkpointed(cfg, inp.capped(cap_gib))
                elif grad_ckpt and stream:
                    out += _streamed(cfg, cap_gib, gpu)
    # a line's partly checkpointed variant before its fully checkpointed one: it recomputes less
    return sorted(out, key=lambda c: (c[0].offload_weights, CHECKPOINTING.index(_checkpointing(c[0])),
                                      c[0].uncheckpointed_layers == 0, c[0].kernels != "onecard", c[0].micro_batch))


def _partly_checkpointed(cfg: BenchConfig, inp) -> list[tuple[BenchConfig, float]]:
    """The setting with as many of its last layers out of the checkpoints as the planner fits on ``inp`` (its
    plan inputs on the capped card; ``training.uncheckpointed_layers``, plan/suggest.py), when that is some but
    not all of them."""
    from onecard.plan.memory import plan_memory
    from onecard.plan.suggest import most_uncheckpointed_layers

    k = most_uncheckpointed_layers(inp)
    if not 0 < k < inp.shape.num_hidden_layers:
        return []
    planned = plan_memory(inp.with_(uncheckpointed_layers=k)).required_bytes / GIB
    return [(dataclasses.replace(cfg, uncheckpointed_layers=k), planned)]


def _streamed(cfg: BenchConfig, cap_gib: float, gpu: str) -> list[tuple[BenchConfig, float]]:
    """The setting with its base weights streamed (plan/streaming.py), when the planner expects that to fit the card
    it does not fit otherwise: tried after every setting that fits without streaming (copies cost speed)."""
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import plan_memory
    from onecard.plan.streaming import plan_streaming

    sp = plan_streaming(plan_memory(inputs_from_recipe(cfg.to_recipe(), gpu=gpu).capped(cap_gib)))
    if sp.verdict != "fits with streaming" or not sp.streamed_layers:
        return []
    return [(dataclasses.replace(cfg, offload_weights=True, resident_layers=sp.resident_layers, cuda_graph=False),
             sp.device_bytes / GIB)]


def _checkpointing(cfg: BenchConfig) -> tuple[bool, bool]:
    return cfg.grad_ckpt, cfg.offload_activations


def probe(recipe, *, cap_gib: float, gpu: str, measure: Callable[[BenchConfig], dict[str, Any]],
          steps: int = 2, warmup: int = 1, progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Measure the planner's surviving candidates; the fastest that ran without OOM, as --set overrides.

    ``measure(cfg)`` returns a bench record (``status``, ``tokens_per_s``, ``peak_reserved_gib``); on a GPU it is
    ``run.run_config`` with the memory cap set. ``progress`` gets a line before and after each measurement (a
    streamed candidate builds and pins its base first: tens of seconds each).
    """
    base = config_from_recipe(recipe, seq=longest_sequence(recipe), steps=steps, warmup=warmup, gpu=gpu)
    base.memory_cap_gib = cap_gib
    tried, oom_from, last_rate = [], {}, {}
    for cfg, planned in candidates(base, cap_gib, gpu, stream=recipe.training.offload_weights is not False):
        line = (*_checkpointing(cfg), cfg.kernels, cfg.offload_weights, cfg.uncheckpointed_layers > 0)
        if cfg.micro_batch >= oom_from.get(line, 10**9):
            continue
        best_rate = max(last_rate.values(), default=0.0)
        if best_rate and planned_tokens_per_s(cfg) < PLAN_SLOWER * best_rate:
            continue  # the planner (within 15% on measured rows) expects it far slower than one already measured
        progress(f"measuring {_describe(cfg)} (planned {planned:.1f} GiB)")
        rec = measure(cfg)
        rate = rec.get("tokens_per_s") or 0.0
        progress(f"  {rec.get('status')}: {rate:,.0f} tokens/s, {rec.get('peak_reserved_gib') or 0:.1f} GiB reserved")
        # Saturation: once the matmuls are large enough to fill the GPU, a bigger micro-batch only amortises the
        # fixed per-step cost further; less than SATURATION gain from doubling it ends the line (saves device time).
        if line in last_rate and rate < last_rate[line] * SATURATION:
            oom_from[line] = min(oom_from.get(line, 10**9), cfg.micro_batch * 2)
        last_rate[line] = max(rate, last_rate.get(line, 0.0))
        tried.append({"micro_batch": cfg.micro_batch, "grad_ckpt": cfg.grad_ckpt,
                      "uncheckpointed_layers": cfg.uncheckpointed_layers,
                      "offload_activations": cfg.offload_activations, "kernels": cfg.kernels,
                      "offload_weights": cfg.offload_weights, "resident_layers": cfg.resident_layers,
                      "cuda_graph": cfg.cuda_graph, "planned_gib": round(planned, 2), "status": rec.get("status"),
                      "tokens_per_s": rec.get("tokens_per_s"), "peak_reserved_gib": rec.get("peak_reserved_gib")})
        if rec.get("status") == "oom":
            oom_from[line] = min(oom_from.get(line, 10**9), cfg.micro_batch)
    ok = [t for t in tried if t["status"] == "ok" and t["tokens_per_s"]]
    if not ok:
        return {"best": None, "tried": tried, "seq": base.seq, "cap_gib": cap_gib}
    best = max(ok, key=lambda t: t["tokens_per_s"])
    sets = [f"training.micro_batch_size={best['micro_batch']}", f"training.grad_ckpt={str(best['grad_ckpt']).lower()}",
            f"training.offload_activations={str(best['offload_activations']).lower()}",
            f"training.kernels={best['kernels']}", f"training.fused_ce={'true' if best['kernels'] != 'none' else 'false'}",
            f"training.offload_weights={'true' if best['offload_weights'] else 'false'}",
            f"training.uncheckpointed_layers={best['uncheckpointed_layers']}"]
    if base.cuda_graph:  # the recipe asked for a graph; say whether the pick keeps it
        sets.append(f"training.cuda_graph={str(best['cuda_graph']).lower()}")
    return {"best": best, "set": sets, "tried": tried, "seq": base.seq, "cap_gib": cap_gib}


def _describe(cfg: BenchConfig) -> str:
    return _setting(cfg.micro_batch, cfg.grad_ckpt, cfg.offload_activations, cfg.kernels, cfg.offload_weights,
                    cfg.resident_layers, cfg.uncheckpointed_layers, cfg.cuda_graph)


def _setting(micro_batch, grad_ckpt, offload_activations, kernels, offload_weights, resident_layers,
             uncheckpointed_layers=0, cuda_graph=False) -> str:
    ckpt = ("offloaded" if offload_activations else "on") if grad_ckpt else "off"
    if uncheckpointed_layers:
        ckpt += f" but the last {uncheckpointed_layers} layers"
    stream = f" streamed weights ({resident_layers} resident)" if offload_weights else ""
    graph = " CUDA graph" if cuda_graph else ""
    return f"b{micro_batch} checkpointing {ckpt} kernels={kernels}{stream}{graph}"


def summary_lines(result: dict[str, Any], cap_gib: float) -> list[str]:
    """The human report of :func:`probe`'s result: every setting measured, then the pick as --set overrides."""
    if result["best"] is None:
        return [f"nothing fit in {cap_gib:g} GiB at seq {result['seq']} (tried {len(result['tried'])} settings)"]
    lines = []
    for t in result["tried"]:
        setting = _setting(t["micro_batch"], t["grad_ckpt"], t["offload_activations"], t["kernels"],
                           t["offload_weights"], t["resident_layers"], t["uncheckpointed_layers"], t["cuda_graph"])
        lines.append(f"  {setting}: {t['status']} "
                     f"{(t['tokens_per_s'] or 0):,.0f} tokens/s (measured), planned {t['planned_gib']} GiB")
    lines.append(f"fastest that fits: {result['best']['tokens_per_s']:,.0f} tokens/s (measured) with "
                 + " ".join(f"--set {s}" for s in result["set"]))
    return lines
