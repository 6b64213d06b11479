"""`onecard plan (RECIPE | --model M --method ...)`: will it fit, and what does each part cost.

Structure, so other sections (time and cost) can be added without touching the memory part: :func:`build_report`
returns a ``payload`` dict (the --json output) and a list of rich renderables (the human output); each entry of
``SECTIONS`` is a function ``section(recipe, inputs, memory_plan) -> (key, payload_part, renderables)`` appended
in order. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer

from onecard.commands.common import JsonOption, SetOption, print_json

Section = Callable[..., tuple[str, dict, list]]
SECTIONS: list[Section] = []   # extra sections after the memory budget (e.g. time and cost)


def _time_cost_section(recipe, inputs, memory_plan):
    from onecard.plan.timecost import time_cost_section  # speed, time to train, deadline, claim check, cost

    return time_cost_section(recipe, inputs, memory_plan)


SECTIONS.append(_time_cost_section)

VERDICT_STYLE = {"fits": "bold green", "tight": "bold yellow", "does not fit": "bold red",
                 "fits with streaming": "bold green"}


def direct_overrides(model=None, method=None, task=None, seq=None, batch=None, grad_accum=None, rank=None, gpu=None,
                     num_gpus=None, optimizer=None, grad_ckpt=None, offload_activations=None, kernels=None,
                     attn=None) -> list[str]:
    """Direct flags as ``--set`` assignments, so they are validated exactly like the recipe file."""
    pairs = [("model.name_or_path", model), ("method", method), ("task", task), ("data.seq_len", seq),
             ("training.micro_batch_size", batch), ("training.grad_accum", grad_accum), ("adapter.rank", rank),
             ("plan.gpu", gpu), ("training.num_gpus", num_gpus), ("training.optimizer", optimizer),
             ("training.grad_ckpt", grad_ckpt), ("training.offload_activations", offload_activations),
             ("training.kernels", kernels), ("model.attn_implementation", attn)]
    out = []
    for key, value in pairs:
        if value is not None:
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def load_plan_recipe(recipe_path: Path | None, overrides: list[str]):
    """The recipe to plan: a file, or just the flags (then --model is required)."""
    from onecard.errors import UserError
    from onecard.recipe import load_recipe

    if recipe_path is None and not any(o.startswith("model.name_or_path=") for o in overrides):
        raise UserError("nothing to plan", where="onecard plan",
                        fix="give a recipe file, or --model PRESET_OR_DIR (see onecard models)")
    return load_recipe(recipe_path, overrides)


def use_data_stats(recipe) -> dict:
    """Put the data file's measured counts into the recipe's planning fields (data.num_examples,
    data.mean_tokens_per_example: the fields are for planning without data); returns what was used."""
    from onecard.lint.data import measured_data

    report, note = measured_data(recipe)
    used: dict = {"note": note, "path": recipe.data.path}
    if report is not None and report.examples:
        recipe.data.num_examples = used["num_examples"] = report.examples
    elif report is not None and recipe.data.num_examples is None:
        recipe.data.num_examples = used["num_examples"] = report.records
    if report is not None and report.mean_tokens_trained:
        recipe.data.mean_tokens_per_example = used["mean_tokens_per_example"] = round(report.mean_tokens_trained, 1)
    return used


def build_report(recipe, gpu: str | None = None) -> tuple[dict, list]:
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import plan_memory
    from onecard.plan.streaming import streaming_section, streams_to_fit
    from onecard.plan.suggest import also_worth_it, suggest_fixes

    inputs = inputs_from_recipe(recipe, gpu=gpu)
    plan = plan_memory(inputs)
    fixes = suggest_fixes(plan)
    extras = also_worth_it(plan)
    payload = {"memory": plan.to_dict(), "suggestions": [s.to_dict() for s in fixes],
               "also_worth_it": [s.to_dict() for s in extras]}
    stream = streaming_section(plan)
    streams = streams_to_fit(plan) is not None
    if streams:  # the recipe streams (training.offload_weights): its verdict, not the unstreamed plan's
        payload["verdict"] = "fits with streaming"
        fixes = []
    renderables = memory_renderables(plan, fixes, stream if streams else None)
    renderables += [_also_text(s) for s in extras]
    for section in SECTIONS:
        key, part, extra = section(recipe, inputs, plan)
        payload[key] = part
        renderables.extend(extra)
    if stream is not None:  # after the time section: hours per epoch at the streamed speed
        tokens = payload.get("time_cost", {}).get("time", {}).get("tokens_per_epoch")
        stream["hours_per_epoch"] = tokens / stream["tokens_per_s"] / 3600 if tokens else None
        stream["cloud_cost_per_epoch"] = _streamed_cloud_cost(inputs.gpu.id, stream["hours_per_epoch"])
        payload["streaming"] = stream
        renderables.insert(len(memory_renderables(plan, fixes, stream if streams else None)), streaming_text(stream))
    return payload, renderables


def _streamed_cloud_cost(gpu_id: str, hours: float | None) -> dict | None:
    """The card's first cloud hourly price (catalog/prices.yaml) times the streamed hours: an estimate."""
    from onecard.catalog.prices import load_prices

    prices = load_prices(None)
    row = next(((prov, price) for gid, prov, price in prices.cloud if gid == gpu_id), None)
    if row is None or hours is None:
        return None
    return {"provider": row[0], "amount": round(prices.convert(row[1]) * hours, 2), "currency": prices.output_currency,
            "per_hour": row[1].amount, "date": row[1].date, "label": "estimated"}


def streaming_text(s: dict):
    from rich.text import Text

    from onecard.plan.memory import GIB

    style = "bold green" if s["verdict"] == "fits with streaming" else "bold red"
    line = Text(f"with streamed base weights (training.offload_weights): {s['verdict']}", style=style)
    ram = "assumed, set plan.host_ram_gib" if s["host_ram_assumed"] else "plan.host_ram_gib"
    cost = s.get("cloud_cost_per_epoch")
    line.append(f"  ({s['device_bytes'] / GIB:.1f} GiB on the card: {s['resident_layers']} resident layers + "
                f"{s['slots']} slots; pinned host {s['host_total_bytes'] / GIB:.1f} GiB = weights "
                f"{s['host_weight_bytes'] / GIB:.1f} + checkpoints {s['host_activations_bytes'] / GIB:.1f}, of "
                f"{s['host_ram_bytes'] / GIB:.0f} GiB host RAM ({ram}); ~{s['tokens_per_s']:,.0f} tokens/s with "
                f"the copies vs {s['tokens_per_s_without_copies']:,.0f} without"
                + (f", {s['hours_per_epoch']:.1f} h/epoch" if s.get("hours_per_epoch") else "")
                + (f", {cost['amount']:.2f} {cost['currency']}/epoch at {cost['provider']}" if cost else "")
                + ", estimated)",
                style="")
    return line if not s["notes"] else Text.assemble(line, "\n", Text("note: " + s["notes"][0], style="yellow"))


def _also_text(suggestion):
    from rich.text import Text

    sets = " ".join(f"--set {k}={str(v).lower()}" for k, v in suggestion.set.items())
    return Text(f"also worth it: {suggestion.change}: {sets}", style="cyan")


def memory_renderables(plan, fixes, stream: dict | None = None) -> list:
    """The memory table and verdict; ``stream``: the recipe streams its base weights and that fits, so the verdict
    is "fits with streaming" with the bytes on the card (plan/streaming.py)."""
    from rich.table import Table
    from rich.text import Text

    from onecard.plan.memory import GIB

    p = plan.inputs
    cap = plan.capacity_bytes
    what = (f"{p.shape.id} {p.method} {p.task}" + (f" r={p.rank}" if p.is_adapter else "")
            + f", seq {p.seq_len} x micro-batch {p.micro_batch}" + (" (x2: chosen+rejected)" if p.task == "dpo" else "")
            + f", {p.optimizer}, checkpointing {'on' if p.grad_ckpt else 'off'}, kernels {p.kernels}, attn {p.attn}")
    gpus = f"{p.num_gpus} x " if p.num_gpus > 1 else ""
    table = Table(title=f"Memory plan (estimated) on {gpus}{p.gpu.name}, {cap / GIB:.1f} GiB", caption=what)
    for col, justify in (("component", "left"), ("GiB", "right"), ("of card", "right"), ("", "left")):
        table.add_column(col, justify=justify)
    for c in plan.components:
        tags = [t for t in (c.kind if c.kind == "estimated" else "", "host" if c.where == "host" else "",
                            "outside allocator" if not c.in_allocator else "") if t]
        if c.at_peak and c.where == "device":
            table.add_row(c.label, f"{c.gib:.2f}", f"{c.bytes / cap:.0%}", ", ".join(tags))
        else:
            why = "host" if c.where == "host" else "not at the peak phase"
            table.add_row(Text(c.label, style="dim"), Text(f"({c.gib:.2f})", style="dim"), "", Text(why, style="dim"))
    table.add_section()
    table.add_row("torch max_memory_reserved (predicted)", f"{plan.allocator_bytes / GIB:.2f}",
                  f"{plan.allocator_bytes / cap:.0%}", "")
    table.add_row(Text("total on the card", style="bold"), Text(f"{plan.total_bytes / GIB:.2f}", style="bold"),
                  Text(f"{plan.total_bytes / cap:.0%}", style="bold"), f"peak phase: {plan.peak_phase}")
    if stream is None:
        verdict = Text(f"verdict: {plan.verdict}", style=VERDICT_STYLE[plan.verdict])
        verdict.append(f"  ({plan.total_bytes / GIB:.1f} of {cap / GIB:.1f} GiB)", style="")
    else:
        verdict = Text("verdict: fits with streaming", style=VERDICT_STYLE["fits with streaming"])
        verdict.append(f"  ({stream['device_bytes'] / GIB:.1f} of {cap / GIB:.1f} GiB on the card with "
                       f"{stream['streamed_layers']} layers' base weights streamed; {plan.total_bytes / GIB:.1f} GiB "
                       "without streaming)", style="")
    out: list = [table, verdict]
    out += [Text(f"note: {n}", style="yellow") for n in plan.notes]
    if fixes:
        fix_table = Table(title="Changes that make it fit (cheapest first)")
        for col in ("change", "--set", "new total GiB", "verdict"):
            fix_table.add_column(col)
        for s in fixes:
            sets = " ".join(f"{k}={v}" for k, v in s.set.items())
            fix_table.add_row(s.change, sets, f"{s.total_bytes / GIB:.2f}", s.verdict)
        out.append(fix_table)
    return out


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan(
        recipe_path: Optional[Path] = typer.Argument(None, metavar="[RECIPE]", help="Recipe YAML (or use the flags)."),
        model: Optional[str] = typer.Option(None, "--model", help="Preset (onecard models) or local model dir."),
        method: Optional[str] = typer.Option(None, "--method", help="lora | qlora | dora | full"),
        task: Optional[str] = typer.Option(None, "--task", help="sft | pretrain | dpo | kto"),
        seq: Optional[int] = typer.Option(None, "--seq", help="Sequence length (tokens)."),
        batch: Optional[int] = typer.Option(None, "--batch", help="Micro-batch per GPU."),
        grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Gradient accumulation steps."),
        rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank."),
        gpu: Optional[str] = typer.Option(None, "--gpu", help="Target card (onecard gpus), e.g. rtx4090."),
        num_gpus: Optional[int] = typer.Option(None, "--num-gpus", help="GPUs (FSDP shards weights/grads/optimizer)."),
        optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw_torch_fused | adamw_8bit | ..."),
        grad_ckpt: Optional[bool] = typer.Option(None, "--grad-ckpt/--no-grad-ckpt", help="Gradient checkpointing."),
        offload_activations: Optional[bool] = typer.Option(None, "--offload-activations",
                                                           help="Keep activation checkpoints in host memory."),
        kernels: Optional[str] = typer.Option(None, "--kernels", help="auto | none | onecard | liger"),
        attn: Optional[str] = typer.Option(None, "--attn", help="auto | sdpa | eager | flash_attention_2"),
        claim: Optional[float] = typer.Option(None, "--claim-tokens-per-s",
                                              help="Check a published tokens/s figure against this card's ceiling."),
        deadline_hours: Optional[float] = typer.Option(None, "--deadline-hours",
                                                       help="Does the job finish in H hours (4: daily, 12: overnight, 60: weekend)?"),
        epochs: Optional[float] = typer.Option(None, "--epochs", help="Epochs (training.epochs)."),
        examples: Optional[int] = typer.Option(None, "--examples", help="Training examples (data.num_examples)."),
        mean_tokens: Optional[float] = typer.Option(None, "--mean-tokens",
                                                    help="Mean tokens per example (data.mean_tokens_per_example)."),
        prices: Optional[Path] = typer.Option(None, "--prices", help="Your price file (default: the shipped prices.yaml)."),
        probe: bool = typer.Option(False, "--probe", help="On a CUDA GPU: measure a few steps per micro-batch x "
                                   "checkpointing x fused-kernels setting at the data's longest sequence and print "
                                   "the fastest that fits as --set overrides (onecard.bench.probe)."),
        memory_cap_gib: Optional[float] = typer.Option(None, "--memory-cap-gib",
                                                       help="With --probe: emulate a card of G GiB."),
        overrides: list[str] = SetOption,
        as_json: bool = JsonOption,
    ) -> None:
        """Predict peak GPU memory, component by component, and say whether the run fits the card."""
        flags = direct_overrides(model, method, task, seq, batch, grad_accum, rank, gpu, num_gpus, optimizer,
                                 grad_ckpt, offload_activations, kernels, attn)
        from onecard.plan.timecost import cli_overrides, set_cli_options

        flags += cli_overrides(epochs=epochs, examples=examples, mean_tokens=mean_tokens, deadline_hours=deadline_hours)
        set_cli_options(claim_tokens_per_s=claim, prices_path=str(prices) if prices else None)
        recipe = load_plan_recipe(recipe_path, flags + list(overrides or []))
        if probe:
            _probe(recipe, memory_cap_gib, as_json)
            return
        given = examples is not None or mean_tokens is not None or any(
            o.startswith(("data.num_examples=", "data.mean_tokens_per_example=")) for o in overrides or [])
        data_note = use_data_stats(recipe) if recipe.data.path and not given else None
        payload, renderables = build_report(recipe)
        if data_note:
            from rich.text import Text

            payload["data"] = data_note
            renderables.insert(0, Text(data_note["note"], style="dim"))
        if as_json:
            print_json(payload)
            return
        from rich.console import Console

        console = Console(highlight=False)
        for item in renderables:
            console.print(item)


def _probe(recipe, memory_cap_gib: Optional[float], as_json: bool) -> None:
    """``onecard plan --probe``: the measured search of onecard.bench.probe on this machine's GPU (torch imported
    only here, so a plain ``onecard plan`` stays fast)."""
    import sys

    from onecard.bench.probe import probe, summary_lines
    from onecard.bench.run import detect_device, gpu_catalog_id, run_config
    from onecard.catalog.gpus import get_gpu

    import torch

    if not torch.cuda.is_available():  # detect_device's message names bench's --cpu, which plan has not
        from onecard.errors import UserError

        raise UserError("--probe measures steps on a CUDA GPU, and none is visible here", where="onecard plan --probe",
                        fix="run it on the machine with the GPU, or drop --probe for the estimated plan")
    detect_device(cpu=False)
    gpu_id = gpu_catalog_id()
    cap = memory_cap_gib or get_gpu(gpu_id).memory_gib
    command = " ".join(["onecard", *sys.argv[1:]])
    result = probe(recipe, cap_gib=cap, gpu=gpu_id, measure=lambda cfg: run_config(cfg, "cuda", command=command),
                    progress=lambda line: typer.echo(line, err=True))
    if as_json:
        print_json(result)
    else:
        typer.echo("\n".join(summary_lines(result, cap)))
    if result["best"] is None:
        raise typer.Exit(1)
