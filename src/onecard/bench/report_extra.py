"""The benchmark page's sections that are not ``onecard bench`` rows: data preparation on this 2-core CPU machine
(bench/data_prep.py), ``onecard train`` with streamed weights killed and resumed on the GPU
(bench/stream_train_gpu.py), ``onecard train`` of the 14B workload with an FP8 base under a 24 GiB cap
(bench/train_gpu_e2e.py), a CUDA-graphed step's memory pool by pool (bench/graph_memory_gpu.py), the memory-bound
shares fitted from H100 and H200 rows (bench/calibrate.py), the FP8 base's speed targets per run (the F19 suite parts)
and its quality protocol (bench/fp8_quality_gpu.py). Each reads its raw files in bench/results/ and says what it
measured; nothing here is typed in by hand.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from onecard.bench.calibrate import load_records, superseded_reason
from onecard.bench.report_md import fmt, table


def render_extra(results_dir: Path) -> str:
    return (data_prep_section(results_dir) + stream_train_section(results_dir) + stream_preference_section(results_dir)
            + stream_probe_section(results_dir) + fp8_train_section(results_dir) + graph_memory_section(results_dir)
            + memory_bound_section(results_dir)
            + accelerate_offload_section(results_dir) + deepspeed_offload_section(results_dir)
            + fp8_speed_section(results_dir) + fp8_quality_section(results_dir))


def _results(results_dir: Path, pattern: str) -> list[tuple[str, dict]]:
    """(file name, its JSON) of every result file matching ``pattern``, in name (date) order."""
    return [(f.name, json.loads(f.read_text())) for f in sorted(Path(results_dir).glob(pattern))]


def _section(found: list[tuple[str, dict]], header: str, part) -> str:
    """``header`` then ``part(name, result)`` for each result file; nothing when there are none."""
    return header + "".join(part(name, r) for name, r in found) if found else ""


def _run_line(name: str, r: dict, packages: tuple[str, ...]) -> str:
    """A result file's name, date and the versions it ran on (``packages`` from its ``versions``)."""
    return (f"{name}, {r['date'][:16]}, " + ", ".join(f"{p} {r['versions'][p]}" for p in packages) + ":\n\n")


def streamed_probe(result: dict) -> bool:
    """A probe that tried streamed base weights (a model larger than the card): its own section here."""
    return any(t.get("offload_weights") for t in result.get("tried", []))


def stream_probe_section(results_dir: Path) -> str:
    """``onecard plan --probe`` results that tried streamed weights (bench/results/e2e/probe_*.json)."""
    def part(name: str, r: dict) -> str:
        out: list[str] = []
        v = r["versions"]
        rows = [[f"b{t['micro_batch']}", ("offloaded" if t["offload_activations"] else "on") if t["grad_ckpt"]
                 else "off", t["kernels"], str(t["resident_layers"]) if t["offload_weights"] else "-", t["status"],
                 fmt(t["tokens_per_s"]), fmt(t["planned_gib"], ".2f"), fmt(t["peak_reserved_gib"], ".2f")]
                for t in r["tried"]]
        out.append(f"`{r['command']}` ({name}, {r['date'][:16]}, torch {v['torch']}, transformers "
                   f"{v['transformers']}; cap {r['cap_gib']:g} GiB, seq {r['seq']}; host memory in use peaked at "
                   f"{r['host_used_gib_peak']} GiB of 128):\n\n")
        out.append(table(["micro-batch", "checkpointing", "kernels", "resident layers", "status", "tokens/s",
                          "planned GiB", "peak reserved GiB"], rows))
        out.append(f"\nPicked: `{' '.join(r['set'])}`.\n")
        return "".join(out)

    found = [(n, r) for n, r in _results(Path(results_dir) / "e2e", "probe_*.json") if streamed_probe(r)]
    header = ("\n## `plan --probe` with streamed weights - measured, H200\n\n"
              "Each setting that does not fit the card is tried again with its base weights streamed (after every "
              "setting that fits; none does here), the resident layer count the planner's for that setting.\n\n")
    return _section(found, header, part)


def stream_preference_section(results_dir: Path) -> str:
    """DPO and KTO through ``onecard train`` on a streamed base (bench/stream_train_gpu.py --preference)."""
    def part(name: str, r: dict) -> str:
        rows = []
        for task in ("dpo", "kto"):
            e = r.get(task, {})
            said = next((x for x in e.get("streaming_lines", []) if x.startswith("streaming")), "")
            losses = e.get("losses") or {}
            rows.append([task, str(e.get("rc")), said, " -> ".join(f"{losses[k]:.4f}" for k in sorted(losses))
                         if losses else "-", fmt((e.get("cuda_peak_reserved_bytes_measured") or 0) / 2**30, ".2f")])
        return (f"{name} (cap {r['cap_gib']} GiB):\n\n"
                + table(["task", "exit", "the trainer's streaming line", "loss by step", "peak reserved GiB"], rows))

    found = _results(results_dir, "stream_preference_*.json")
    header = ("\n## DPO and KTO with streamed weights - measured, H200\n\n"
              "`PYTHONPATH=src python bench/stream_train_gpu.py OUT --preference`: the same random Llama 3 8B "
              "checkpoint as above, `onecard train` with `task: dpo` / `task: kto`, `--memory-cap-gib 12`, offloaded "
              "checkpoints, 4 steps of 2 examples at seq 512 (that the preference spine streams, not its quality).\n\n")
    return _section(found, header, part)


def deepspeed_offload_section(results_dir: Path) -> str:
    def part(name: str, r: dict) -> str:
        rows = [[x["variant"], x["status"], fmt(x.get("tokens_per_s")), fmt(x.get("peak_reserved_gib"), ".2f"),
                 f"{x.get('moved_from_zero', '-')} of {x.get('lora_B_tensors', '-')}", (x.get("error") or "")[:90]]
                for x in r["variants"]]
        return (_run_line(name, r, ("torch", "transformers", "peft", "deepspeed", "bitsandbytes"))
                + table(["variant", "status", "tokens/s", "peak reserved GiB", "lora_B tensors trained", "error"],
                        rows))

    found = _results(results_dir, "deepspeed_offload_*.json")
    header = ("\n## DeepSpeed ZeRO-3 parameter offload for LoRA and QLoRA - measured, H200\n\n"
              "`PYTHONPATH=src:.whl/site python3 bench/deepspeed_offload_gpu.py`: a random Llama 3 8B, peft LoRA "
              "r16 on all seven projections, ZeRO stage 3 with `offload_param: cpu` (pinned), bf16, torch AdamW on the "
              "adapter, non-reentrant checkpointing, seq 2048, micro-batch 1, 1 + 3 steps, one process. QLoRA: NF4 "
              "linears stored as bf16 (what ZeRO-3 needs to partition them). Compare with the Llama 3 8B seq 2048 b1 "
              "streamed rows above.\n\n")
    return _section(found, header, part)


def accelerate_offload_section(results_dir: Path) -> str:
    def part(name: str, r: dict) -> str:
        rows = []
        for x in r["variants"]:
            grads = x.get("grads_after_first_backward") or {}
            off = grads.get("offloaded_layers", {})
            trained = f"{off.get('with_grad', 0)} of {off.get('tensors', 0)}" if grads else "-"
            rows.append([x["order"], x["status"], x["stage"], fmt(x.get("tokens_per_s")),
                         fmt(x.get("peak_reserved_gib"), ".2f"), f"{len(x['device_map_summary']['gpu_layers'])} / "
                         f"{len(x['device_map_summary']['offloaded_layers'])}", trained, (x.get("error") or "")[:90]])
        return (_run_line(name, r, ("torch", "transformers", "peft", "accelerate"))
                + table(["order", "status", "stage", "tokens/s", "peak reserved GiB", "layers GPU / CPU",
                         "offloaded layers' adapter tensors with a gradient", "error"], rows))

    found = _results(results_dir, "accelerate_offload_*.json")
    header = ("\n## accelerate's CPU offload for LoRA, beside onecard's streaming - measured, H200\n\n"
              "`PYTHONPATH=src python3 bench/accelerate_offload_gpu.py`: a random Llama 3 8B (bf16), `accelerate."
              "dispatch_model` with the embeddings, head and the first layers on the GPU and the rest on the CPU, peft "
              "LoRA r16 on all seven projections, non-reentrant checkpointing, seq 2048, micro-batch 1, 1 + 3 steps; "
              "in both orders a user could take. Compare with the Llama 3 8B seq 2048 b1 rows of the streamed-weights "
              "section above (the same shape streamed with 8 resident layers under a 24 GiB cap, and without).\n\n")
    return _section(found, header, part)


def data_prep_section(results_dir: Path) -> str:
    files = sorted(Path(results_dir).glob("data_prep_*.jsonl"))
    rows = [json.loads(line) | {"_file": f.name} for f in files for line in f.read_text().splitlines() if line]
    if not rows:
        return ""
    v = rows[-1]["versions"]
    what = {("full", 1): "`onecard train`, first launch", ("full", 2): "`onecard train`, second launch (cache)",
            ("model_only", 1): "`onecard train`, model only (200 examples)"}
    body = [[r["date"], r["_file"], f"{r['data_bytes'] / 1e6:,.0f} MB",
             what.get((r["workload"], r["launch"]), r["command"].split()[1]) if "train" in r["command"]
             else f"`onecard data`, launch {r['launch']}", fmt(r["wall_s"], ",.1f"), fmt(r["cpu_s"], ",.1f"),
             fmt(r.get("to_first_step_s"), ",.1f"), fmt(r["peak_rss_gib"], ".2f"),
             " / ".join(fmt((r.get("phase_seconds") or {}).get(k), ",.1f") for k in ("reading", "tokenising")),
             f"{r['loadavg_1m_before']:.1f} / {r['loadavg_1m_after']:.1f}"] for r in rows]
    return ("\n## Data preparation - measured, this 2-core CPU machine\n\n"
            "`python3 bench/make_chat_data.py --examples 50000 --out /tmp/chat50k.jsonl` (chat examples with a system "
            "prompt and 1-3 turns, ~500 SmolLM2 tokens each), then `python3 bench/data_prep.py --data /tmp/chat50k.jsonl "
            "--repeats 1 --out bench/results/data_prep_DATE.jsonl`: the demo's SmolLM2-135M-Instruct, packing at seq "
            "2048, `max_steps: 1`, each row one process under `/usr/bin/time -v`, an empty data cache before each "
            "repeat. \"to first step\" is wall minus the trainer's measured step; \"model only\" is the same recipe on "
            f"200 examples. Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, datasets "
            f"{v['datasets']}, tokenizers {v['tokenizers']}. The machine is shared with other agents: the load "
            "average (2 cores) is in the last column, and wall times under load are not an idle machine's.\n\n"
            + table(["date", "rows", "data", "run", "wall s", "CPU s", "to first step s", "peak RSS GiB",
                     "read / tokenise s", "load before / after"], body))


def stream_train_section(results_dir: Path) -> str:
    def part(name: str, r: dict) -> str:
        out: list[str] = []
        s = r.get("summary_a", {})
        said = re.search(r"streaming the base weights of (\d+) layers .*?\((\d+) resident", " ".join(r["a"]["tail"].split()))
        out.append(table(
            ["file", "cap GiB", "steps", "A / A2 / B exit", "peak reserved GiB (A)", "tokens/s (A, steady)",
             "max loss diff A-A2", "max loss diff A-B", "max adapter diff A-B"],
            [[name, str(r["cap_gib"]), str(r["steps"]),
              f"{r['a']['rc']} / {r['a2']['rc']} / killed {r['b_killed']['rc']}, resumed {r['b_resumed']['rc']}",
              fmt(s.get("cuda_peak_reserved_bytes_measured", 0) / 2**30, ".2f"),
              fmt(s.get("steady_tokens_per_s_measured")), str(r.get("max_loss_diff_a_a2")),
              str(r.get("max_loss_diff_after_resume")), str(r.get("max_adapter_diff"))]]))
        if said:
            out.append(f"\n{said.group(1)} layers streamed, {said.group(2)} resident (the trainer's own line).\n")
        return "".join(out)

    found = _results(results_dir, "stream_train_*.json")
    header = ("\n## `onecard train` with streamed weights, killed and resumed - measured, H200\n\n"
              "`PYTHONPATH=src python bench/stream_train_gpu.py OUT`: a random Llama 3 8B saved as a safetensors "
              "checkpoint (15 GiB of bf16 weights), trained through the CLI with `--memory-cap-gib 12`, "
              "`training.offload_weights: true`, offloaded checkpoints and `training.deterministic: true`; A and A2 "
              "run uninterrupted, B is killed with SIGKILL after step 6 and resumed from its step-4 checkpoint.\n\n")
    return _section(found, header, part)


def fp8_train_section(results_dir: Path) -> str:
    """bench/train_gpu_e2e.py's 14B cases: ``onecard train`` itself (load, FP8 quantisation, steps, held-out evals,
    adapter save) of Qwen 2.5 14B under ``--memory-cap-gib 24``, eager and replayed from a CUDA graph."""
    def part(name: str, r: dict) -> str:
        line = _run_line(name, r, ("torch", "transformers", "peft"))
        head = line.replace(":\n\n", f", {r['gpu']} ({r['code']}):\n\n")
        rows = []
        for run in r["runs"]:
            pvm = run.get("plan_vs_measured") or {}
            evals = ", ".join(f"{e['eval_loss']:.3f}" for e in run.get("evals", []))
            steps = str(len(run["losses"])) if "losses" in run else "-"
            rows.append([run["name"], str(run["rc"]), steps, evals or "-",
                         fmt(run.get("first_step_s"), ".2f"), fmt(run.get("steady_tokens_per_s_measured")),
                         fmt(pvm.get("predicted_tokens_per_s")), fmt(pvm.get("measured_peak_reserved_gib"), ".2f"),
                         fmt(pvm.get("predicted_peak_reserved_gib"), ".2f")])
        errors = [f"{run['name']}: `{_error_line(run['tail'])}`" for run in r["runs"] if run["rc"]]
        return head + table(["run", "exit", "steps", "held-out loss (evals)", "first step s", "tokens/s (steady)",
                             "planned tokens/s", "peak reserved GiB", "planned GiB"], rows) + "\n" + (
            "\nFailed: " + "; ".join(errors) + "\n" if errors else "")

    header = ("\n## `onecard train` of Qwen 2.5 14B with an FP8 base under a 24 GiB cap - measured\n\n"
              "A random Qwen 2.5 14B saved as a safetensors checkpoint, trained through the CLI (task pretrain, "
              "2,048-token rows, micro-batch 2, two micro-batches a step, checkpoints on the card, 12 steps, the "
              "held-out loss every 6 steps) with `--memory-cap-gib 24`, eager and with `training.cuda_graph`. The "
              "steady tokens/s counts the steps after the first, evals included; the first step pays the warm-up "
              "passes and (graphed) the capture, with Triton's cache already warm from the eager run.\n\n")
    return _section(_results(Path(results_dir) / "e2e", "train_e2e_14b_*.json"), header, part)


def graph_memory_section(results_dir: Path) -> str:
    """bench/graph_memory_gpu.py: where a graphed step's memory goes (the graph's private pool and the eager pool),
    against the same step run eagerly, with today's plan for each row's configuration beside it."""
    from onecard.bench.config import BenchConfig
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import GIB, plan_memory

    results = Path(results_dir)
    out = []
    for path in sorted(results.glob("graph_memory_*.jsonl")) + sorted(results.glob("h100/graph_memory_*.jsonl")):
        for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()):
            if "error" in r:
                out.append([path.name, r["case"], r["mode"], r["error"]] + [""] * 7)
                continue
            inputs = inputs_from_recipe(BenchConfig(**r["config"]).to_recipe(), gpu=r["config"]["gpu"])
            planned = [plan_memory(replace(inputs, heldout_loss=e)).allocator_bytes / GIB for e in (False, True)]
            graph_gib = sum(v for k, v in r.items() if k.startswith("steps_graph:") and k.endswith("_reserved_gib"))
            out.append([path.name, r["case"], r["mode"], r["versions"]["gpu"].removeprefix("NVIDIA "),
                        f"{r['steps_default_reserved_gib']:.2f}", f"{graph_gib:.2f}",
                        f"{r['steps_max_reserved_gib']:.2f}", f"{planned[0]:.2f}",
                        f"{r['eval_default_reserved_gib']:.2f}", f"{r['eval_max_reserved_gib']:.2f}",
                        f"{planned[1]:.2f}"])
    if not out:
        return ""
    return ("\n## A CUDA-graphed step's memory, pool by pool - measured\n\n"
            "`PYTHONPATH=src:.whl/site python bench/graph_memory_gpu.py` (torch 2.11, transformers 5.17, one process): "
            "5 optimizer steps, then the held-out loss of one micro-batch (eval/loss.py, as `onecard train` runs it "
            "between steps), then one more step; pool sizes from `torch.cuda.memory_snapshot()` "
            "(bench/memory_snapshot.py). A graph's private pool serves only the graph, so the eager work around it "
            "(the optimizer's first state, the eval) takes blocks of its own, and the graph keeps every gradient "
            "between replays. Planned: today's planner for the row's configuration, without and with a held-out "
            "loss between steps (plan/memory.py). A graph pool beside an eager row is an earlier row's graph, still "
            "alive in the process.\n\n"
            + table(["file", "case", "mode", "card", "eager pool GiB", "graph pool GiB", "peak reserved GiB",
                     "planned GiB", "eager pool after eval", "peak reserved with eval", "planned with eval"], out))


def memory_bound_section(results_dir: Path) -> str:
    """The per-kernel memory-bound shares the planner extrapolates with (bench/calibrate.py memory_bound_shares): each
    H100 row against the H200 calibration row of its configuration."""
    from onecard.bench.calibrate import measurement_rows, memory_bound_shares, split

    results = Path(results_dir)
    card_rows = measurement_rows(load_records(results_dir=results / "h100"))
    shares = memory_bound_shares(card_rows, split(measurement_rows(load_records(results_dir=results)))[0])
    by_id = {r["id"]: r for r in card_rows}
    out = []
    for kernels, fit in shares.items():
        for pair in fit["pairs"]:
            row = by_id[pair["card_row"]]
            out.append([kernels, pair["card_row"].removeprefix("bench-h100-sxm-"), row["date"],
                        fmt(row["tokens_per_s"]), pair["reference_row"], f"{pair['tokens_per_s_ratio']:.3f}", f"{pair['share']:+.3f}",
                        f"{fit['value']:g}"])
    if not out:
        return ""
    return ("\n## Memory-bound share per kernel class, from H100 and H200 rows - measured\n\n"
            "The planner moves an efficiency measured on one card to another with the share m of the step that "
            "scales with memory bandwidth (plan/speed.py). An H100 SXM has the H200's bf16 peak and 0.70x its "
            "bandwidth, so a configuration run on both gives m = (e_H200 / e_H100 - 1) / (4800/3350 - 1); a class's m "
            "is its pairs' median, clamped to [0, 1] (`python -m onecard.bench.calibrate` writes it into "
            "calibration/measurements.json). H100 rows: bench/results/h100 (`OUT=$OUT bash bench/gpu_suite.sh 0 "
            "H100P:400 H100Q:300` and the F19 parts; torch 2.11, transformers 5.17); the H200 rows are the calibration's own, "
            "measured on earlier code and another host. Classes without a pair keep the profile's 0.35.\n\n"
            + table(["kernels", "H100 row", "date", "H100 tokens/s", "H200 row", "H100 / H200", "m of the pair",
                     "class m"], out))


def _error_line(tail: str) -> str:
    """The exception line of a run's output tail, cut at 160 characters."""
    lines = [line for line in tail.splitlines() if "Error" in line or "error" in line]
    return (lines[-1] if lines else tail.strip().splitlines()[-1])[:160]


FP8_SPEED_TARGETS = {"llama-3-8b": 1.4, "mistral-7b": 1.35, "qwen2.5-7b": 1.35, "qwen2.5-14b": 1.3}  # the issue's


def fp8_speed_section(results_dir: Path) -> str:
    """Per F19 run (one bench/results/h200-f19*.jsonl, or h100/h100-f19*.jsonl: one process), each FP8-base row's
    tokens/s over the same model's bf16 row of that run, against the issue's target for the model. H100 runs live
    in a folder of their own so that the H200 calibration (bench/calibrate.py, results_dir/*.jsonl) never reads
    them; a ratio is taken within one run, so each run's card is named beside it."""
    out = []
    results = Path(results_dir)
    for path in sorted(results.glob("h200-f19*.jsonl")) + sorted(results.glob("h100/h100-f19*.jsonl")):
        rows = load_records([path])
        bf16 = {}  # per model the run's fastest bf16 row: the stricter reference where a run has several
        for r in rows:
            if r.get("quant_base", "none") == "none" and r.get("status") == "ok" and \
                    r["tokens_per_s"] > bf16.get(r["model"], {"tokens_per_s": 0})["tokens_per_s"]:
                bf16[r["model"]] = r
        for r in rows:
            base = bf16.get(r["model"])
            if r.get("quant_base") != "fp8" or r.get("status") != "ok" or base is None:
                continue
            ratio, target = r["tokens_per_s"] / base["tokens_per_s"], FP8_SPEED_TARGETS.get(r["model"])
            setting = ("offloaded ckpt" if r.get("offload_activations") else "ckpt") + (
                f" but the last {r['uncheckpointed_layers']} layers" if r.get("uncheckpointed_layers") else "") + (
                f", cap {r['memory_cap_gib']:g} GiB" if r.get("memory_cap_gib") else "") + (
                ", CUDA graph" if r.get("cuda_graph") else "")
            reason = superseded_reason(r)
            name = path.name if reason is None else f"{path.name} (superseded: {reason})"
            card = r["versions"]["gpu"].removeprefix("NVIDIA ")
            out.append([name, card, r["date"][:16], r["model"], setting, fmt(base["tokens_per_s"]),
                        fmt(r["tokens_per_s"]), f"{ratio:.3f}x", f">= {target}x" if target else "",
                        "" if target is None else "yes" if ratio >= target else "**no**",
                        f"{r['step_s_min']:.3f}-{r['step_s_max']:.3f}"])
    if not out:
        return ""
    return ("\n## FP8 base: speed targets per run - measured, H200 and H100\n\nEach line is one `onecard bench` "
            "suite part (one process, bench/gpu_suite.sh): the FP8-base row over the fastest bf16 row of the same "
            "model in that run (bf16 uncapped; the 14B FP8 rows under `--memory-cap-gib 24`). Step range: the FP8 "
            "row's fastest and slowest timed step. The targets are the issue's, set for the H200; an H100 run's ratio "
            "is its own card's.\n\n" + table(["file", "card", "date", "model", "FP8 setting", "bf16 tokens/s",
                                             "FP8 tokens/s", "ratio", "target", "met", "FP8 step s"], out))


def fp8_quality_section(results_dir: Path) -> str:
    def part(name: str, r: dict) -> str:
        one, two, three = r["1_loss_curves"], r["2_adapter_on_bf16_base"], r["3_step0_gradients"]
        return table(["file", "date", "item", "measured", "threshold", "met"], [
            [name, r["date"], "1. mean loss, last 50 of 200 steps",
             f"bf16 {one['mean_last_50']['none']:.4f}, FP8 {one['mean_last_50']['fp8']:.4f} "
             f"({one['relative_difference']:.2%})", "<= 1%", "yes" if one["pass"] else "**no**"],
            ["", "", "2. FP8-trained adapter, held-out loss on FP8 / bf16 base",
             f"{two['heldout_fp8_base']['loss']:.4f} / {two['heldout_bf16_base']['loss']:.4f} "
             f"({two['relative_difference']:.2%})", "<= 1%", "yes" if two["pass"] else "**no**"],
            ["", "", "3. step-0 adapter gradients, cosine FP8 vs bf16",
             f"worst {three['worst_cosine']:.3f} ({three['worst_tensor'].split('model.model.')[-1]}), median "
             f"{three['median_cosine']:.3f}", ">= 0.99", "yes" if three["pass"] else "**no**"]])

    found = _results(results_dir, "fp8_quality_*.json")
    header = ("\n## FP8 base quality protocol - measured, H200\n\nPre-registered in notes/fp8.md; "
              "`PYTHONPATH=src python bench/fp8_quality_gpu.py OUT`.\n\n")
    return _section(found, header, part)
