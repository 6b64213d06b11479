"""accelerate's big-model CPU offload (dispatch_model) for LoRA training of a random Llama 3 8B shape.

Two orders a user could take, each trained 1 warm-up + 3 timed steps at seq 2048, micro-batch 1:
  dispatch_then_peft: dispatch_model(device_map) first, then peft LoRA r16 on all 7 projections (the order of
                      from_pretrained(device_map=...) + get_peft_model);
  peft_then_dispatch: peft first, then dispatch_model with the same map under peft's module names.
For each: status, where it failed, tokens/s, peak reserved GiB, and how many trainable tensors received a gradient
(on the GPU layers and on the offloaded layers), so a run that "works" but trains nothing offloaded shows it.

GPU:  PYTHONPATH=src python3 bench/accelerate_offload_gpu.py            -> $OUT/accelerate_offload.json
CPU:  PYTHONPATH=src python3 bench/accelerate_offload_gpu.py --tiny     (tiny llama; offloads to "disk" with main device cpu,
      the only offload accelerate does without a GPU; checks the peft/ckpt setup and the hooks' behaviour)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import tempfile
import time
import traceback

import torch

GIB = 1024 ** 3


def build(tiny: bool, build_device: str):
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from onecard.bench.build import fill_random_, hf_config
    from onecard.bench.config import BenchConfig

    if tiny:
        from onecard.tiny import tiny_config

        config = tiny_config("llama", vocab_size=320, num_hidden_layers=4)
    else:
        config = hf_config(BenchConfig(model="llama-3-8b"))
    config.use_cache = False
    with torch.device(build_device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    fill_random_(model)
    return model.cpu(), config


def gpu_layer_count(model, target_gib: float) -> int:
    """Decoder layers that fit on the GPU beside embed/norm/lm_head within target_gib."""
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    other_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers." not in n)
    return max(0, min(len(model.model.layers), int((target_gib * GIB - other_bytes) // layer_bytes)))


def device_map_for(n_layers: int, k_gpu: int, gpu, off: str, prefix: str = "") -> dict:
    dm = {f"{prefix}model.embed_tokens": gpu, f"{prefix}model.rotary_emb": gpu,
          f"{prefix}model.norm": gpu, f"{prefix}lm_head": gpu}
    for i in range(n_layers):
        dm[f"{prefix}model.layers.{i}"] = gpu if i < k_gpu else off
    return dm


def apply_lora(model):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, cfg)


def setup_ckpt(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def trainable_summary(model, k_gpu: int) -> dict:
    """Trainable tensors by (GPU layer / offloaded layer) x (device), and how many hold a gradient now."""
    out: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        idx = layer_index(name)
        group = "gpu_layers" if idx is None or idx < k_gpu else "offloaded_layers"
        g = out.setdefault(group, {"tensors": 0, "devices": {}, "with_grad": 0})
        g["tensors"] += 1
        g["devices"][str(p.device)] = g["devices"].get(str(p.device), 0) + 1
        g["with_grad"] += int(p.grad is not None)
    return out


def train(model, vocab: int, device, seq: int, steps: int, k_gpu: int, res: dict) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    res["trainable_params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    cuda = torch.cuda.is_available() and str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        ids = torch.randint(0, vocab, (1, seq), generator=gen).to(device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res["stage"] = f"forward step {step}"
        out = model(input_ids=ids, labels=ids)
        res["stage"] = f"backward step {step}"
        out.loss.backward()
        if step == 0:
            res["grads_after_first_backward"] = trainable_summary(model, k_gpu)
        res["stage"] = f"optimizer step {step}"
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(out.loss.detach()))
        print(f"  step {step}: {times[-1]:.3f} s loss {losses[-1]:.4f}", flush=True)
    res["stage"] = "done"
    timed = times[1:] if len(times) > 1 else times
    res["step_s"] = times
    res["losses"] = losses
    res["tokens_per_s"] = seq * len(timed) / sum(timed)
    if cuda:
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        res["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB


def run_variant(order: str, args, gpu, off: str, offload_dir) -> dict:
    from accelerate import dispatch_model

    res: dict = {"order": order, "status": "error", "stage": "build"}
    model = None
    try:
        t0 = time.perf_counter()
        model, config = build(args.tiny, args.build_device)
        res["build_s"] = time.perf_counter() - t0
        n_layers = config.num_hidden_layers
        k_gpu = args.gpu_layers if args.gpu_layers is not None else gpu_layer_count(model, args.gpu_weight_gib)
        res["device_map_summary"] = {"layers": n_layers, "gpu_layers": list(range(k_gpu)),
                                     "offloaded_layers": list(range(k_gpu, n_layers)), "offload_to": off,
                                     "embed_norm_lm_head_rotary": str(gpu)}
        kw = {"main_device": gpu, "offload_dir": offload_dir} if off == "disk" else {}
        if order == "dispatch_then_peft":
            res["stage"] = "dispatch_model"
            model = dispatch_model(model, device_map=device_map_for(n_layers, k_gpu, gpu, off), **kw)
            res["stage"] = "get_peft_model"
            model = apply_lora(model)
        else:
            res["stage"] = "get_peft_model"
            model = apply_lora(model)
            res["stage"] = "dispatch_model"
            model = dispatch_model(model, device_map=device_map_for(n_layers, k_gpu, gpu, off, "base_model.model."),
                                   **kw)
        res["stage"] = "gradient_checkpointing_enable"
        setup_ckpt(model)
        model.train()
        if torch.cuda.is_available():
            res["gpu_weights_gib_after_dispatch"] = torch.cuda.memory_allocated() / GIB
        res["trainable_before_training"] = trainable_summary(model, k_gpu)
        train(model, config.vocab_size, gpu, args.seq, args.steps, k_gpu, res)
        res["status"] = "ok"
    except Exception as exc:  # a failure is the result: record what and where
        res["error_type"] = type(exc).__name__
        res["error"] = str(exc)[:2000]
        res["traceback_tail"] = traceback.format_exc()[-3000:]
        print(f"  {order} failed at {res['stage']}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    finally:
        if torch.cuda.is_available():
            res.setdefault("peak_reserved_gib", torch.cuda.max_memory_reserved() / GIB)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return res


def versions() -> dict:
    import accelerate
    import peft
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
         "accelerate": accelerate.__version__}
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name(0)
    return v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny llama on the CPU, disk offload (setup check)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4, help="1 warm-up + the rest timed")
    ap.add_argument("--gpu-weight-gib", type=float, default=6.5)
    ap.add_argument("--gpu-layers", type=int, default=None)
    ap.add_argument("--orders", default="dispatch_then_peft,peft_then_dispatch")
    args = ap.parse_args()
    if args.tiny:
        gpu, off, args.build_device = "cpu", "disk", "cpu"
        args.seq = min(args.seq, 64)
        args.gpu_layers = 2 if args.gpu_layers is None else args.gpu_layers
    else:
        gpu, off, args.build_device = 0, "cpu", "cuda"  # build on the GPU (seconds), then .cpu() before dispatch
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), "model": "tiny-llama" if args.tiny else "llama-3-8b (random bf16)",
              "method": "lora r16 q,k,v,o,gate,up,down; grad ckpt use_reentrant=False; AdamW",
              "seq": args.seq, "micro_batch": 1, "steps": args.steps, "timed_steps": max(1, args.steps - 1),
              "reference": "onecard weight streaming, same shape: bench/results/h200-s18.jsonl rows "
                           "'llama-3-8b lora r16 seq2048 b1 ckpt onecard stream-weights(res8)' and without streaming",
              "variants": []}
    out_dir = os.environ.get("OUT") or tempfile.mkdtemp()
    path = os.path.join(out_dir, "accelerate_offload.json")
    for order in args.orders.split(","):
        print(f"== {order}", flush=True)
        with tempfile.TemporaryDirectory() as offload_dir:  # one per variant: accelerate reuses an index.json
            report["variants"].append(run_variant(order, args, gpu, off, offload_dir))
        with open(path, "w") as f:  # written after each variant: nothing lost if the call is cut short
            json.dump(report, f, indent=1)
    for v in report["variants"]:
        print(json.dumps({k: v.get(k) for k in ("order", "status", "stage", "error_type", "error", "tokens_per_s",
                                                "peak_reserved_gib", "grads_after_first_backward")})[:1500])
    print("wrote", path)


if __name__ == "__main__":
    main()
