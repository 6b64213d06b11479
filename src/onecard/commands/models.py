"""`onecard models`: the model shape presets (copied from each model's config.json; see catalog/models.py)."""

from __future__ import annotations

import typer

from onecard.commands.common import JsonOption, print_json


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models(as_json: bool = JsonOption) -> None:
        """List model shape presets usable wherever a model directory is (plan, scope, bench)."""
        from dataclasses import asdict

        from onecard.catalog.models import PRESETS

        if as_json:
            print_json([{**asdict(s), "total_params": s.total_params()} for s in PRESETS.values()])
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title="Model shape presets (no weights)")
        for col in ("id", "type", "params", "layers", "hidden", "mlp", "heads/kv", "vocab", "context", "from"):
            table.add_column(col)
        for s in PRESETS.values():
            table.add_row(s.id, s.model_type, f"{s.total_params() / 1e9:.2f}B", str(s.num_hidden_layers),
                          str(s.hidden_size), str(s.intermediate_size), f"{s.num_attention_heads}/{s.num_key_value_heads}",
                          str(s.vocab_size), str(s.max_position_embeddings), s.hub_id)
        Console(highlight=False).print(table)
