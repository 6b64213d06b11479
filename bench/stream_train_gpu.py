"""``onecard train`` with streamed base weights on an emulated small card, killed with SIGKILL and resumed.

Run on the GPU machine from the repo root: ``PYTHONPATH=src python bench/stream_train_gpu.py OUTDIR [--preference]``
(``--preference``: DPO and KTO short runs on the same streamed base instead, OUTDIR/stream_preference.json).
A random Llama 3 8B (bf16, 15 GiB of weights: more than the 12 GiB card emulated with ``--memory-cap-gib 12``) is
saved as a safetensors checkpoint, so the trainer must read it layer by layer (train/layerwise.py) and stream
(``training.offload_weights: true``). CLI runs in subprocesses, same recipe and seed, ``training.deterministic``
(without it the CUDA attention backward makes any two runs drift apart at rounding level from step 2 on):
A) uninterrupted; A2) the same again (the noise floor); B) killed with SIGKILL once its step-4 checkpoint exists and
two more steps have run, then ``--resume`` to the end. Writes OUTDIR/stream_train.json: exit codes, the loss series,
the largest per-step loss difference after the resume point and between A and A2, the largest adapter-weight
difference at the end, peak reserved memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpu_e2e as e2e  # noqa: E402

CAP_GIB, STEPS, SAVE_EVERY, KILL_AFTER_STEP = 12, 10, 4, 6


def cli(recipe_path: Path, *flags: str, popen: bool = False):
    cmd = [sys.executable, "-m", "onecard.cli", "train", str(recipe_path), "--memory-cap-gib", str(CAP_GIB), *flags]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def adapter(run_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def preference_runs(model_dir: Path, pref: Path, result: dict) -> None:
    """DPO and KTO through ``onecard train`` on the same streamed base under the cap: exit code, losses, the
    trainer's streaming line, peak reserved (short runs: that the preference spine streams, not its quality)."""
    kto = pref.with_name("kto.jsonl")  # each pair as two KTO records: the chosen desirable, the rejected not
    with kto.open("w") as out:
        for line in pref.read_text().splitlines():
            r = json.loads(line)
            for key, label in (("chosen", True), ("rejected", False)):
                out.write(json.dumps({"prompt": r["prompt"], "completion": r[key], "label": label}) + "\n")
    for task, data in (("dpo", pref), ("kto", kto)):
        # KTO's KL reference point mismatches the pairs of one optimizer step: it needs two examples per step
        training = {"max_steps": 4, "micro_batch_size": 1, "grad_accum": 2, "offload_weights": True,
                    "offload_activations": True}
        path = e2e.recipe(f"stream-{task}", model_dir, data, task=task, format="auto", seq_len=512,
                          training=training)
        t = time.perf_counter()
        proc = cli(path, "--overwrite")
        text = proc.stdout + proc.stderr
        run_dir = e2e.ROOT / "runs" / f"stream-{task}"
        entry = {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t, 1),
                 "streaming_lines": [x for x in text.splitlines() if "stream" in x.lower()][:5], "tail": text[-2000:]}
        if proc.returncode == 0:
            entry["losses"] = losses(run_dir)
            summary = json.loads((run_dir / "summary.json").read_text())
            entry["cuda_peak_reserved_bytes_measured"] = summary.get("cuda_peak_reserved_bytes_measured")
        result[task] = entry
        print(task, "rc", proc.returncode, flush=True)


def main() -> None:
    outdir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    if "--preference" in sys.argv:  # DPO and KTO only: stream_preference.json
        e2e.ROOT.mkdir(parents=True, exist_ok=True)
        result: dict = {"cap_gib": CAP_GIB}
        model_dir = e2e.build_model_dir("llama-3-8b")
        _, pref = e2e.write_data()
        preference_runs(model_dir, pref, result)
        (outdir / "stream_preference.json").write_text(json.dumps(result, indent=1, default=str))
        print(json.dumps(result, indent=1, default=str)[:5000])
        return
    e2e.ROOT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model_dir = e2e.build_model_dir("llama-3-8b")
    chat, _ = e2e.write_data()
    result: dict = {"cap_gib": CAP_GIB, "steps": STEPS, "model_dir_s": round(time.perf_counter() - start, 1)}
    extra = dict(seq_len=1024, training={"max_steps": STEPS, "save_every_steps": SAVE_EVERY, "micro_batch_size": 2,
                                         "offload_weights": True, "offload_activations": True, "deterministic": True})
    recipe_a = e2e.recipe("stream-a", model_dir, chat, **json.loads(json.dumps(extra)))
    recipe_a2 = e2e.recipe("stream-a2", model_dir, chat, **json.loads(json.dumps(extra)))
    recipe_b = e2e.recipe("stream-b", model_dir, chat, **json.loads(json.dumps(extra)))
    for key, path in (("a", recipe_a), ("a2", recipe_a2)):
        t = time.perf_counter()
        a = cli(path, "--overwrite")
        result[key] = {"rc": a.returncode, "wall_s": round(time.perf_counter() - t, 1),
                       "tail": (a.stdout + a.stderr)[-2500:]}
        print(key, "rc", a.returncode, flush=True)
    run_a, run_a2, run_b = (e2e.ROOT / "runs" / n for n in ("stream-a", "stream-a2", "stream-b"))
    t = time.perf_counter()
    proc = cli(recipe_b, "--overwrite", popen=True)
    killed_at = None
    while proc.poll() is None and time.perf_counter() - t < 400:
        time.sleep(0.5)
        metrics = run_b / "metrics.jsonl"
        if metrics.is_file() and losses(run_b) and max(losses(run_b)) >= KILL_AFTER_STEP:
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = max(losses(run_b))
            break
    proc.wait()
    result["b_killed"] = {"rc": proc.returncode, "killed_after_step": killed_at,
                          "tail": (proc.stdout.read() if proc.stdout else "")[-1500:]}
    print("B killed at", killed_at, "rc", proc.returncode, flush=True)
    b = cli(recipe_b, "--resume")
    result["b_resumed"] = {"rc": b.returncode, "tail": (b.stdout + b.stderr)[-2500:]}
    print("B resumed rc", b.returncode, flush=True)
    if result["a"]["rc"] == 0 and result["a2"]["rc"] == 0 and b.returncode == 0:
        la, la2, lb = losses(run_a), losses(run_a2), losses(run_b)
        result["losses_a"], result["losses_a2"], result["losses_b"] = la, la2, lb
        after = [s for s in la if s > SAVE_EVERY and s in lb]
        result["max_loss_diff_after_resume"] = max(abs(la[s] - lb[s]) for s in after)
        result["max_loss_diff_a_a2"] = max(abs(la[s] - la2[s]) for s in la)
        wa, wa2, wb = adapter(run_a), adapter(run_a2), adapter(run_b)
        result["max_adapter_diff"] = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
        result["max_adapter_diff_a_a2"] = max(float((wa[k].float() - wa2[k].float()).abs().max()) for k in wa)
        summary = json.loads((run_a / "summary.json").read_text())
        result["summary_a"] = {k: summary.get(k) for k in ("final_loss", "tokens_per_s_measured",
                                                            "steady_tokens_per_s_measured", "cuda_peak_reserved_bytes_measured",
                                                            "setup_peak_reserved_bytes_measured", "plan_vs_measured")}
    (outdir / "stream_train.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("losses")}, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
