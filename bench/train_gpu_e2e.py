"""GPU end-to-end check of ``onecard train`` itself (not the bench): LoRA (kernels auto), QLoRA and DPO; on request
(``ONECARD_E2E_ONLY=e2e-14b-fp8-eager,e2e-14b-fp8-graph``) the domain-adaptation workload, Qwen 2.5 14B with an FP8
base under ``--memory-cap-gib 24`` (an RTX 4090's memory), eager and replayed from a CUDA graph, with a held-out
loss every few steps beside the graph's pool.

Run on the GPU machine from the repo root: ``PYTHONPATH=src python bench/train_gpu_e2e.py OUTDIR``
(``ONECARD_E2E_ONLY=e2e-lora,e2e-lora-offload-packed`` runs only those cases).
Builds a random model of the Llama 3.2 1B preset's shape (vocabulary 128,256 as the real model, so the LM head and
loss cost what they really cost) in /tmp, with onecard.tiny's byte-level BPE tokenizer and ChatML template (only
its ~320 ids occur in the data: the tokenizer is small, the model's vocabulary is not), writes synthetic chat and
preference JSONL, and runs ``onecard train`` three times through the CLI in subprocesses (exit codes are checked).
Writes OUTDIR/train_e2e.json: per run, exit code, first/final loss, and summary.json's plan_vs_measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("/tmp/onecard_e2e")
STEPS = 20


def build_model_dir(preset: str = "llama-3.2-1b") -> Path:
    """A random bf16 model of ``preset``'s shape saved as a checkpoint (safetensors, 4 GB shards), with the tiny
    tokenizer; kept across calls on the same machine."""
    import torch
    from transformers import AutoModelForCausalLM

    from onecard.bench.build import fill_random_, hf_config
    from onecard.bench.config import BenchConfig
    from onecard.tiny import build_tiny_tokenizer

    path = ROOT / f"{preset}-random"
    if (path / "config.json").is_file():
        return path
    print(f"building and saving a random {preset} in {path}", flush=True)
    tok = build_tiny_tokenizer()
    config = hf_config(BenchConfig(model=preset))
    config.eos_token_id, config.pad_token_id, config.bos_token_id = tok.eos_token_id, tok.pad_token_id, None
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fill_random_(model)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="4GB")
    tok.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def write_data() -> tuple[Path, Path]:
    names = ["fox", "owl", "cat", "dog", "elk", "bee", "ant", "yak"]
    chat, pref = ROOT / "chat.jsonl", ROOT / "pref.jsonl"
    with chat.open("w") as c, pref.open("w") as p:
        for i in range(400):
            a, b = names[i % 8], names[(i * 3 + 1) % 8]
            reply = f"The {a} sees the {b}. " * 20  # ~300-400 tokens: rows near seq_len
            c.write(json.dumps({"messages": [{"role": "user", "content": f"What does the {a} see?"},
                                             {"role": "assistant", "content": reply}]}) + "\n")
            p.write(json.dumps({"prompt": f"What does the {a} see?", "chosen": reply,
                                "rejected": f"The {b} hides from the {a}. " * 20}) + "\n")
    return chat, pref


def write_documents() -> tuple[Path, Path]:
    """Plain-text documents of ~2,000+ tokens (truncated to seq_len 2048: every row full) and a held-out few."""
    train, heldout = ROOT / "docs.jsonl", ROOT / "docs_heldout.jsonl"
    for path, n, offset in ((train, 200, 0), (heldout, 8, 1000)):
        with path.open("w") as f:
            for i in range(offset, offset + n):
                f.write(json.dumps({"text": f"Document {i}. " + "The fox sees the owl near the river. " * 120}) + "\n")
    return train, heldout


def big_cases() -> list[tuple[str, Path, list[str]]]:
    """Qwen 2.5 14B LoRA, FP8 base, seq 2048 x 2, two micro-batches a step, checkpoints on the card, 24 GiB cap."""
    model_dir = build_model_dir("qwen2.5-14b")
    docs, heldout = write_documents()
    cases = []
    for name, graph in (("e2e-14b-fp8-eager", False), ("e2e-14b-fp8-graph", True)):
        tree_extra = {"task": "pretrain", "format": "text", "seq_len": 2048, "quant": {"base": "fp8"},
                      "eval": {"every_steps": 6}, "eval_path": str(heldout),
                      "training": {"max_steps": 12, "micro_batch_size": 2, "grad_accum": 2, "kernels": "onecard",
                                   "offload_weights": False, "cuda_graph": graph}}
        cases.append((name, recipe(name, model_dir, docs, **tree_extra), ["--memory-cap-gib", "24"]))
    return cases


def recipe(name: str, model_dir: Path, data: Path, **extra) -> Path:
    import yaml

    tree = {"name": name, "model": {"name_or_path": str(model_dir)}, "method": extra.pop("method", "lora"),
            "task": extra.pop("task", "sft"), "adapter": {"rank": 16},
            "data": {"path": str(data), "format": extra.pop("format", "chat"), "seq_len": extra.pop("seq_len", 512),
                     "packing": extra.pop("packing", False), "eval_path": extra.pop("eval_path", None)},
            "training": {"max_steps": STEPS, "micro_batch_size": 4, "grad_accum": 2, "learning_rate": 1e-3,
                         "grad_ckpt": True, "log_every_steps": 1, "save_every_steps": 0, **extra.pop("training", {})},
            "output_dir": str(ROOT / "runs" / "{name}"), "plan": {"gpu": "h200"}, **extra}
    path = ROOT / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def run(name: str, recipe_path: Path, args: list[str] = ()) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onecard.cli", "train", str(recipe_path), "--overwrite", *args],
                          capture_output=True, text=True, timeout=420)
    out = {"name": name, "rc": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
           "tail": (proc.stdout + proc.stderr)[-1500:]}
    summary_path = ROOT / "runs" / name / "summary.json"
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        out.update({k: s.get(k) for k in ("first_loss", "final_loss", "kernels", "kernels_patched",
                                          "varlen_attention_calls", "dtype", "steps",
                                          "tokens_per_s_measured", "steady_tokens_per_s_measured",
                                          "setup_peak_reserved_bytes_measured", "plan_vs_measured")})
    metrics = ROOT / "runs" / name / "metrics.jsonl"
    if metrics.is_file():  # a failed run's steps too
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        out["losses"] = [round(r["loss"], 4) for r in records if r.get("loss") is not None]
        out["evals"] = [{k: v for k, v in r.items() if k.startswith("eval_") or k == "step"} for r in records
                        if any(k.startswith("eval_") for k in r)]
        steps = [r for r in records if r.get("tokens_per_s")]
        if steps:  # the rate is cumulative: the first step's includes warm-up and, graphed, the capture
            out["first_step_s"] = round(steps[0]["tokens"] / steps[0]["tokens_per_s"], 2)
            out["peak_memory_gib"] = round(max(r["peak_memory_bytes"] for r in steps) / 2**30, 2)
    return out


def main() -> None:
    outdir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    ROOT.mkdir(parents=True, exist_ok=True)
    only = os.environ.get("ONECARD_E2E_ONLY")  # e.g. "e2e-dpo": re-run one case
    runs = small_cases() if not only or any(not n.startswith("e2e-14b") for n in only.split(",")) else []
    runs = [(n, p, []) for n, p in runs if not only or n in only.split(",")]
    if only and "e2e-14b" in only:  # ~30 GB written and read back: only on request
        runs += [case for case in big_cases() if case[0] in only.split(",")]
    results = []
    for name, path, args in runs:
        results.append(run(name, path, args))
        r = results[-1]
        print(f"{name}: rc={r['rc']} loss {r.get('first_loss')} -> {r.get('final_loss')} kernels={r.get('kernels')} "
              f"pvm={json.dumps(r.get('plan_vs_measured'))}", flush=True)
        if r["rc"] != 0:
            print(r["tail"], flush=True)
        (outdir / "train_e2e.json").write_text(json.dumps(results, indent=1, default=str))  # each case kept


def small_cases() -> list[tuple[str, Path]]:
    """The Llama 3.2 1B shape: LoRA, QLoRA, offloaded checkpoints with packed rows, DPO."""
    model_dir = build_model_dir()
    chat, pref = write_data()
    return [("e2e-lora", recipe("e2e-lora", model_dir, chat)),
            ("e2e-qlora", recipe("e2e-qlora", model_dir, chat, method="qlora")),
            # offloaded checkpoints (split into halves by the kernels) and packed rows (varlen attention)
            ("e2e-lora-offload-packed", recipe("e2e-lora-offload-packed", model_dir, chat, packing=True, seq_len=2048,
                                               training={"offload_activations": True})),
            ("e2e-dpo", recipe("e2e-dpo", model_dir, pref, task="dpo", format="auto",
                               training={"learning_rate": 5e-5, "micro_batch_size": 2}))]


if __name__ == "__main__":
    main()
