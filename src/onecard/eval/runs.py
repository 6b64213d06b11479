"""Open a finished run (or a bare model / adapter directory) for evaluation and export.

A run directory (docs/architecture.md) holds ``recipe.yaml`` and either ``adapter/`` (PEFT) or ``model/``
(full fine-tune). The base model is loaded exactly as training loaded it (``onecard.train.model.load_base``:
same dtype rules, QLoRA quantisation) so eval numbers describe the model that was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onecard.errors import UserError


@dataclass
class LoadedRun:
    model: Any  # a PeftModel when ``adapter_path`` is set, else a transformers model
    tokenizer: Any
    recipe: Any  # onecard.recipe.Recipe
    run_dir: Path | None
    adapter_path: Path | None
    base_source: str  # the base model's directory (or hub id) for adapters; the model dir for full runs


def read_run_recipe(run_dir: Path):
    from onecard.recipe import load_recipe

    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise UserError("not a run directory (no recipe.yaml)", where=str(run_dir),
                        fix="pass the directory `onecard train` wrote (runs/<name>), or use --model DIR [--adapter DIR]")
    return load_recipe(path)


def run_weights(run_dir: Path, recipe) -> tuple[Path | None, Path | None]:
    """(adapter_dir, model_dir) of a finished run; exactly one is set."""
    adapter, full = Path(run_dir) / "adapter", Path(run_dir) / "model"
    if recipe.is_adapter:
        if not (adapter / "adapter_config.json").is_file():
            raise UserError("the run has no trained adapter (adapter/adapter_config.json)", where=str(run_dir),
                            fix="let `onecard train` finish (or resume it) before evaluating or exporting")
        return adapter, None
    if not (full / "config.json").is_file():
        raise UserError("the run has no trained model (model/config.json)", where=str(run_dir),
                        fix="let `onecard train` finish (or resume it) before evaluating or exporting")
    return None, full


def load_run(run_dir: str | Path, device: str | None = None, dtype: str | None = None) -> LoadedRun:
    """Base + trained adapter (or the full fine-tuned model) of a run, in eval mode."""
    run_dir = Path(run_dir)
    recipe = read_run_recipe(run_dir)
    if dtype is not None:
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": dtype})})
    adapter, full = run_weights(run_dir, recipe)
    if adapter is not None:
        return _with_adapter(recipe, adapter, device, run_dir)
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name_or_path": str(full)}),
                                       "method": "full"})
    from onecard.train.model import load_base

    model, tokenizer, source = load_base(recipe, device)
    model.eval()
    return LoadedRun(model, tokenizer, recipe, run_dir, None, source)


def load_model_dirs(model_dir: str, adapter_dir: str | None = None, device: str | None = None,
                    dtype: str = "auto") -> LoadedRun:
    """``--model DIR [--adapter DIR]``: a recipe with defaults is built so loading follows the same rules."""
    from onecard.recipe import Recipe

    recipe = Recipe(model={"name_or_path": model_dir, "dtype": dtype}, method="lora" if adapter_dir else "full")
    if adapter_dir:
        path = Path(adapter_dir)
        if not (path / "adapter_config.json").is_file():
            raise UserError("no PEFT adapter here (adapter_config.json missing)", where=str(path),
                            fix="point --adapter at a directory written by save_pretrained / onecard export --format adapter")
        return _with_adapter(recipe, path, device, None)
    from onecard.train.model import load_base

    model, tokenizer, source = load_base(recipe, device)
    model.eval()
    return LoadedRun(model, tokenizer, recipe, None, None, source)


def _with_adapter(recipe, adapter: Path, device: str | None, run_dir: Path | None) -> LoadedRun:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from onecard.train.model import load_base

    base, tokenizer, source = load_base(recipe, device)
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    model.eval()
    if (adapter / "tokenizer_config.json").is_file():  # the run's own copy (may carry a chat template)
        tokenizer = AutoTokenizer.from_pretrained(str(adapter))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return LoadedRun(model, tokenizer, recipe, run_dir, adapter, source)
