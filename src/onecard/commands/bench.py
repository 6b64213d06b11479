"""`onecard bench`: measured tokens/s and peak memory on this machine's GPU, beside the planner's prediction."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from onecard.commands.common import JsonOption, SetOption
from onecard.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(
        recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML to measure (one micro-batch at its seq_len)."),
        model: Optional[str] = typer.Option(None, "--model", help="Preset (llama-3-8b, ...) or local model dir."),
        method: Optional[str] = typer.Option(None, "--method", help="lora | qlora | dora | full"),
        seq: Optional[int] = typer.Option(None, "--seq", help="Sequence length (tokens)."),
        batch: Optional[int] = typer.Option(None, "--batch", help="Micro-batch size."),
        rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank."),
        grad_ckpt: Optional[bool] = typer.Option(None, "--grad-ckpt/--no-grad-ckpt", help="Gradient checkpointing."),
        uncheckpointed_layers: Optional[int] = typer.Option(None, "--uncheckpointed-layers", help="The last N "
                                                            "decoder layers without checkpoints (no recompute)."),
        kernels: Optional[str] = typer.Option(None, "--kernels", help="none | onecard | liger | auto"),
        offload_activations: bool = typer.Option(False, "--offload-activations",
                                                 help="Keep the layers' checkpoints in pinned host memory."),
        quant_base: Optional[str] = typer.Option(None, "--quant-base", help="none | fp8: e4m3 frozen base (lora/dora)."),
        offload_weights: bool = typer.Option(False, "--offload-weights",
                                             help="Stream the frozen base weights from pinned host memory."),
        resident_layers: int = typer.Option(0, "--resident-layers", help="With --offload-weights: decoder layers "
                                            "kept on the GPU (the first N)."),
        cuda_graph: bool = typer.Option(False, "--cuda-graph", help="Record forward + backward once as a CUDA graph "
                                        "and replay it (on-card checkpoints, fixed batch shape)."),
        steps: int = typer.Option(4, "--steps", help="Timed optimizer steps."),
        warmup: int = typer.Option(2, "--warmup", help="Untimed warm-up steps."),
        baseline: bool = typer.Option(False, "--baseline", help="Also run plain transformers + peft, same process."),
        memory_cap_gib: Optional[float] = typer.Option(None, "--memory-cap-gib", help="Emulate a card of this size."),
        suite: Optional[Path] = typer.Option(None, "--suite", help="YAML suite of configurations."),
        part: Optional[str] = typer.Option(None, "--part", help="Run only the suite entries with this part."),
        time_budget_s: Optional[float] = typer.Option(None, "--time-budget-s", help="Skip suite entries after this."),
        out: Optional[Path] = typer.Option(None, "--out", help="Append one JSON line per configuration here."),
        cpu: bool = typer.Option(False, "--cpu", help="Run a tiny model on the CPU (tests; no GPU numbers)."),
        probe: bool = typer.Option(False, "--probe", help="With RECIPE: measure micro-batch x checkpointing x fused "
                                   "kernels at the data's longest sequence; print the fastest that fits as --set."),
        sets: Optional[list[str]] = SetOption,
        as_json: bool = JsonOption,
    ) -> None:
        """Measure tokens/s and peak memory of real optimizer steps; print the planner's prediction beside them."""
        from onecard.bench.config import BenchConfig, config_from_recipe
        from onecard.bench.run import detect_device, gpu_catalog_id, load_suite, run_many

        device = detect_device(cpu)
        gpu_id = gpu_catalog_id() if device == "cuda" else "h200"
        args = [a for a in sys.argv[1:] if a != "bench"]
        command = "onecard bench " + " ".join(shlex.quote(a) for a in args)
        if probe:
            _run_probe(recipe, sets, device, gpu_id, memory_cap_gib, command, as_json)
            return
        if suite is not None:
            configs = load_suite(suite, part)
        elif recipe is not None:
            from onecard.recipe import load_recipe

            configs = [config_from_recipe(load_recipe(recipe, sets or []), method=method, seq=seq, micro_batch=batch,
                                          rank=rank, grad_ckpt=grad_ckpt, kernels=kernels,
                                          offload_activations=offload_activations or None, quant_base=quant_base,
                                          uncheckpointed_layers=uncheckpointed_layers, cuda_graph=cuda_graph or None)]
        elif model is not None or cpu:
            configs = [BenchConfig(model=model or "tiny", method=method or "lora", seq=seq or (64 if cpu else 2048),
                                   micro_batch=batch or 1, rank=rank or 16,
                                   grad_ckpt=True if grad_ckpt is None else grad_ckpt, kernels=kernels or "none",
                                   uncheckpointed_layers=uncheckpointed_layers or 0,
                                   offload_activations=offload_activations, quant_base=quant_base or "none",
                                   offload_weights=offload_weights, resident_layers=resident_layers,
                                   cuda_graph=cuda_graph)]
        else:
            raise UserError("nothing to measure", where="onecard bench",
                            fix="give a RECIPE, --model PRESET (onecard models), --suite FILE, or --cpu")
        for cfg in configs:
            if suite is None:
                cfg.steps, cfg.warmup, cfg.baseline, cfg.memory_cap_gib = steps, warmup, baseline, memory_cap_gib
            if cpu:  # presets are too big for a CPU: the tiny model stands in; a local directory is used as is
                from onecard.bench.build import is_preset

                if cfg.model != "tiny" and (is_preset(cfg.model) or not Path(cfg.model).expanduser().is_dir()):
                    cfg.model = "tiny"
                cfg.method = "lora" if cfg.method == "qlora" and cfg.model != "tiny" else cfg.method
                cfg.seq = min(cfg.seq, 256)
            cfg.gpu = gpu_id
        if any(cfg.quant_base == "fp8" for cfg in configs):  # refused up front, not as a failed row per entry
            from onecard.patch.fp8 import check_fp8_device

            check_fp8_device(device)
        printer = _print_json_line if as_json else _print_table
        records = run_many(configs, device, out=out, command=command, time_budget_s=time_budget_s, on_record=printer)
        if any(r.get("status") == "error" for r in records):
            raise typer.Exit(1)


def _run_probe(recipe_path, sets, device, gpu_id, memory_cap_gib, command, as_json) -> None:
    from onecard.bench.probe import probe, summary_lines
    from onecard.bench.run import run_config
    from onecard.catalog.gpus import get_gpu
    from onecard.recipe import load_recipe

    if recipe_path is None or device != "cuda":
        raise UserError("--probe measures a RECIPE on a CUDA GPU", where="--probe",
                        fix="onecard bench RECIPE --probe [--memory-cap-gib G] on the GPU machine")
    recipe = load_recipe(recipe_path, sets or [])
    cap = memory_cap_gib or get_gpu(gpu_id).memory_gib
    result = probe(recipe, cap_gib=cap, gpu=gpu_id, measure=lambda cfg: run_config(cfg, device, command=command),
                    progress=lambda line: typer.echo(line, err=True))
    if as_json:
        _print_json_line(result)
    else:
        typer.echo("\n".join(summary_lines(result, cap)))
    if result["best"] is None:
        raise typer.Exit(1)


def _print_json_line(record: dict) -> None:
    sys.stdout.write(json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _print_table(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{record.get('label')} [{record.get('status')}]", show_header=True)
    table.add_column("")
    table.add_column("measured", justify="right")
    table.add_column("planned", justify="right")
    table.add_column("error", justify="right")
    table.add_row("tokens/s", _fmt(record.get("tokens_per_s"), ",.0f"),
                  _fmt(record.get("predicted_tokens_per_s"), ",.0f"),
                  _fmt(record.get("predicted_tokens_per_s_error_pct"), "+.1f") + "%")
    table.add_row("peak reserved GiB", _fmt(record.get("peak_reserved_gib"), ".2f"),
                  _fmt(record.get("predicted_peak_gib"), ".2f"),
                  _fmt(record.get("predicted_peak_error_pct"), "+.1f") + "%")
    table.add_row("peak allocated GiB", _fmt(record.get("peak_allocated_gib"), ".2f"), "", "")
    table.add_row("s/step", _fmt(record.get("s_per_step"), ".3f"), "", "")
    table.add_row("MFU", _fmt(None if record.get("mfu") is None else 100 * record["mfu"]) + "%", "", "")
    if record.get("baseline_tokens_per_s") is not None:
        table.add_row("baseline tokens/s", _fmt(record.get("baseline_tokens_per_s"), ",.0f"), "", "")
        table.add_row("baseline reserved GiB", _fmt(record.get("baseline_peak_reserved_gib"), ".2f"), "", "")
        table.add_row("speed-up", _fmt(record.get("speedup"), ".2f") + "x", "", "")
        table.add_row("memory ratio", _fmt(record.get("memory_ratio"), ".2f"), "", "")
    console = Console()
    console.print(table)
    if record.get("memory_cap_gib"):
        console.print(f"memory cap {record['memory_cap_gib']:g} GiB: {record.get('non_allocator_gib_at_cap', 0):.2f} "
                      "GiB held outside PyTorch's allocator (CUDA context, handles) subtracted")
    for key in ("error", "kernels_note", "predicted_note", "predicted_speed_note"):
        if record.get(key):
            console.print(f"[dim]{key}: {record[key]}[/dim]")
