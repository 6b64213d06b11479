"""`onecard export RUN_DIR --format adapter|merged|gguf [--quant TYPE] --out DIR`: ship the tune, verified as it
is written. A gguf export also writes an Ollama Modelfile beside the .gguf."""

from __future__ import annotations

from pathlib import Path

import typer

from onecard.commands.common import JsonOption, print_json, quiet_transformers


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        run_dir: Path = typer.Argument(..., help="Run directory written by onecard train (recipe.yaml + adapter/ or model/)."),
        fmt: str = typer.Option(..., "--format", "-f", help="adapter (PEFT, safetensors) | merged (transformers dir) | gguf (llama.cpp)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory (must be new or empty)."),
        dtype: str = typer.Option("bfloat16", "--dtype", help="merged: stored dtype (bfloat16, float16, float32)."),
        gguf_type: str = typer.Option("f16", "--quant", "--gguf-type",
                                      help="gguf: f16, bf16, f32, q8_0 or q4_k_m (q4_k_m needs the gguf-quant extra: llama-cpp-python)."),
        max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="merged: largest safetensors shard."),
        device: str = typer.Option(None, "--device", help="Where to run the verification (default: cuda if available)."),
        json_out: bool = JsonOption,
    ) -> None:
        """Export a run and check the exported model's logits against the trained model's (exit 1 on mismatch)."""
        from rich.console import Console

        from onecard.export import ExportMismatch, export_run

        quiet_transformers()
        console = Console(stderr=json_out, highlight=False)
        log = (lambda text: console.print(f"[dim]{text}[/dim]"))
        try:
            with console.status(f"exporting {run_dir} as {fmt} and verifying ..."):
                result = export_run(run_dir, fmt, out, dtype=dtype, gguf_type=gguf_type,
                                    max_shard_size=max_shard_size, device=device, log=log)
        except ExportMismatch as err:
            if json_out:
                print_json(err.result)
            console.print(f"[bold red]export failed verification[/bold red] {err}\n"
                          f"  details: {Path(out) / 'export.json'}")
            raise SystemExit(1)  # not typer.Exit: cli.main runs click with standalone_mode=False, which returns its code
        if json_out:
            print_json(result)
            return
        _print_result(console, result)


def _print_result(console, result: dict) -> None:
    v = result["verification"]
    console.print(f"[bold green]exported[/bold green] {result['format']} -> {result['out']} "
                  f"({', '.join(result['files'])})")
    for note in result["notes"]:
        console.print(f"  {note}")
    if "Modelfile" in result["files"]:
        console.print(f"  Ollama: cd {result['out']} && ollama create NAME -f Modelfile")
    effect = v.get("adapter_effect_mean_abs")
    effect_text = f"; adapter changes logits by {effect:.3g} mean |Δ|" if effect is not None else ""
    if v.get("nearer_tuned_than_base"):
        effect_text += f" (export is {v['mean_abs_err_vs_base']:.3g} from the base: nearer the tuned model)"
    console.print(f"  verified in {v.get('runtime', 'transformers')} ({v['stored_dtype']}, {v['positions']} positions): max |Δlogit| {v['max_abs_err']:.3g}, "
                  f"mean {v['mean_abs_err']:.3g}; {v['metric']} = {v['value']:.3g} <= {v['tolerance']:.3g}; "
                  f"top-1 agreement {v['top1_agreement']:.1%}{effect_text}")

