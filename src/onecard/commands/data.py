"""`onecard data RECIPE`: tokenise, mask and pack the recipe's data into the cache ahead of training, and
show what the trainer will see (``--stats``)."""

from __future__ import annotations

from pathlib import Path

import typer

from onecard.commands.common import JsonOption, SetOption, print_json


def register(app: typer.Typer) -> None:
    @app.command("data")
    def data(
        recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML file."),
        overrides: list[str] = SetOption,
        stats: bool = typer.Option(False, "--stats", help="Print the token-length histogram, truncated and dropped "
                                   "counts, trained-token fraction and packing efficiency."),
        num_proc: int = typer.Option(None, "--num-proc", min=1, help="Tokenising worker processes (default: the cores)."),
        rebuild: bool = typer.Option(False, "--rebuild", help="Prepare again even if the cache has this data."),
        as_json: bool = JsonOption,
    ) -> None:
        """Prepare the data into the cache (a later `onecard train` starts without re-tokenising)."""
        from onecard.data import build_dataset
        from onecard.recipe import load_recipe

        recipe = load_recipe(recipe_path, overrides or [])
        if recipe.task in ("dpo", "kto"):
            from onecard.errors import UserError

            raise UserError("onecard data prepares sft and pretrain data; preference data is read at train time",
                            where="task", fix="run onecard train directly for dpo/kto")
        tokenizer = _load_tokenizer(recipe)
        splits = {}
        for split in ("train", "eval"):
            dataset = build_dataset(recipe, tokenizer, split, progress=True, num_proc=num_proc, rebuild=rebuild)
            if dataset.entry is not None:
                splits[split] = {"cache": str(dataset.entry), "from_cache": dataset.from_cache, "rows": len(dataset),
                                 "format": dataset.format, **dataset.summary}
        if as_json:
            print_json({"splits": splits})
            return
        from rich.console import Console

        from onecard.data.stats import render_stats

        console = Console(highlight=False)
        for split, summary in splits.items():
            how = "read from the cache" if summary["from_cache"] else "prepared"
            console.print(f"[bold]{split}[/bold]: {summary['records']:,} records -> {summary['rows']:,} rows, {how}: "
                          f"{summary['cache']}")
            if stats:
                render_stats(console, summary)


def _load_tokenizer(recipe):
    """The tokenizer as training loads it (train.model.load_base), without the model."""
    from transformers import AutoTokenizer

    from onecard.train.model import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source(recipe), trust_remote_code=recipe.model.trust_remote_code,
                                         revision=recipe.model.revision)
