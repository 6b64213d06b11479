"""`onecard scope --gpu G`: the largest model each method fits on a card (from the memory model, not a table)."""

from __future__ import annotations

import typer

from onecard.commands.common import JsonOption, print_json


def register(app: typer.Typer) -> None:
    @app.command("scope")
    def scope(
        gpu: str = typer.Option(..., "--gpu", help="Card to scope (onecard gpus), e.g. rtx4090."),
        seq: int = typer.Option(2048, "--seq", help="Sequence length (tokens).", min=8),
        batch: int = typer.Option(1, "--batch", help="Micro-batch per GPU.", min=1),
        kernels: str = typer.Option("auto", "--kernels", help="auto | none | onecard | liger"),
        as_json: bool = JsonOption,
    ) -> None:
        """Largest model that fits per method (LoRA, QLoRA, DoRA, full SFT, continued pre-training, DPO)."""
        from onecard.catalog.gpus import get_gpu
        from onecard.errors import UserError
        from onecard.plan.scope import scope_table

        if kernels not in ("auto", "none", "onecard", "liger"):
            raise UserError(f"invalid --kernels {kernels!r}", where="--kernels", fix="use auto, none, onecard or liger")
        card = get_gpu(gpu)
        result = scope_table(card, seq_len=seq, micro_batch=batch, kernels="onecard" if kernels == "auto" else kernels)
        if as_json:
            print_json(result)
            return
        _render(result, card)


def _render(result: dict, card) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    table = Table(title=f"Largest model that fits {card.name} ({result['capacity_gib']:.1f} GiB), estimated",
                  caption=f"seq {result['seq_len']} x micro-batch {result['micro_batch']}, "
                          f"gradient checkpointing, kernels {result['kernels']}")
    for col in ("method", "largest preset", "its total GiB", "largest dense (Llama-3-like)", "its total GiB",
                "with streamed weights: preset", "dense"):
        table.add_column(col)
    for row in result["rows"]:
        preset = f"{row['largest_preset']} ({row['largest_preset_params_b']}B)" if row["largest_preset"] else "none"
        dense = f"~{row['largest_dense_params_b']}B" if row["largest_dense_params_b"] else "none"
        streamed = row["streamed_dense_params_b"]
        table.add_row(row["label"], preset, _g(row["largest_preset_gib"]), dense, _g(row["largest_dense_gib"]),
                      row["streamed_preset"] or "-", f"~{streamed}B" if streamed else "-")
    console.print(table)
    console.print("with streamed weights: the frozen base in pinned host memory (training.offload_weights), "
                  "within 64 GiB host RAM (assumed); speed then depends on the host link (onecard plan)")
    for claim in result["claims"]:
        if claim["fits"]:
            console.print(f"[green]holds[/green]  {claim['claim']} ({claim['total_gib']:.1f} GiB)")
        else:
            console.print(f"[red]fails[/red]  {claim['claim']}: {claim['why']}")
            console.print(f"       would work: {'; '.join(claim['would_work'])}")


def _g(value) -> str:
    return "-" if value is None else f"{value:.1f}"
