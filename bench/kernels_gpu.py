"""GPU check for onecard's kernels: parity tests, then speed and memory on a Llama 3 8B shape.

Run on the GPU machine from the repo root:  PYTHONPATH=src python bench/kernels_gpu.py
Writes $OUT/kernels_gpu_tests.json, $OUT/kernels_gpu_speed.json (and logs), prints a table last.
Imports only onecard.kernels / onecard.patch / onecard.tiny (no pydantic on that machine).

Setup (same as the plain-transformers reference in shared/gpu-machine.md): LlamaConfig with
Llama 3 8B's shape and random bf16 weights built on the GPU, LoRA r16 (alpha 32, dropout 0) on all
7 projections via peft, seq 2048, micro-batch 8, non-reentrant gradient checkpointing, AdamW on
the adapters; 2 warm-up steps, then 5 timed steps. Plain and onecard run in one process on one
model (kernels applied, then reverted), peak stats reset between them.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time

import torch

OUT = os.environ.get("OUT", "bench_out")
SEQ, MICRO_BATCH, WARMUP, TIMED = 2048, 8, 2, 5


def run_gpu_tests() -> dict:
    files = ["tests/test_kernels_gpu.py", "tests/test_kernels_packing.py", "tests/test_kernels_ops.py",
             "tests/test_kernels_fused.py"]
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
                              capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as exc:
        return {"returncode": None, "summary": f"timed out after 150 s: {str(exc.stdout)[-300:]}", "seconds": 150}
    log = proc.stdout + proc.stderr
    with open(os.path.join(OUT, "kernels_gpu_tests.log"), "w") as f:
        f.write(log)
    summary = [ln for ln in log.splitlines() if " passed" in ln or " failed" in ln or " error" in ln]
    return {"returncode": proc.returncode, "summary": summary[-1] if summary else log[-500:], "seconds": time.time() - t0}


def build_model():
    import transformers
    from peft import LoraConfig, get_peft_model

    # Llama 3 8B shape: meta-llama/Meta-Llama-3-8B config.json
    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    return model


def measure(model, label: str) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, 128256, (MICRO_BATCH, SEQ), device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for step in range(WARMUP + TIMED):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    timed = sum(times[WARMUP:])
    del opt
    return {
        "label": label, "tokens_per_s": TIMED * MICRO_BATCH * SEQ / timed, "step_s": timed / TIMED,
        "max_memory_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "losses": losses,
    }


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    import peft
    import transformers
    import triton

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "PYTHONPATH=src python bench/kernels_gpu.py", "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "seq": SEQ, "micro_batch": MICRO_BATCH, "warmup": WARMUP, "timed": TIMED}
    from onecard.patch import apply_kernels

    model = build_model()
    results = [measure(model, "plain transformers + peft")]
    print(results[-1], flush=True)
    handle = apply_kernels(model, "onecard")
    patched = handle.summary()
    print(patched, flush=True)
    results.append(measure(model, "onecard kernels"))
    print(results[-1], flush=True)
    handle.revert()
    del model
    torch.cuda.empty_cache()
    record = {"meta": meta, "results": results, "patched": patched}
    with open(os.path.join(OUT, "kernels_gpu_speed.json"), "w") as f:
        json.dump(record, f, indent=1)
    tests = run_gpu_tests() if "--no-tests" not in sys.argv else {"summary": "skipped"}
    with open(os.path.join(OUT, "kernels_gpu_tests.json"), "w") as f:
        json.dump({"meta": meta, "tests": tests}, f, indent=1)
    print("gpu tests:", tests["summary"], flush=True)
    base = results[0]["tokens_per_s"]
    print(f"\n{'setting':28s} {'tokens/s':>10s} {'x plain':>8s} {'reserved GiB':>13s} {'loss0':>7s}")
    for r in results:
        print(f"{r['label']:28s} {r['tokens_per_s']:10,.0f} {r['tokens_per_s'] / base:8.2f} "
              f"{r['max_memory_reserved_gib']:13.1f} {r['losses'][0]:7.3f}")


if __name__ == "__main__":
    main()
