"""``--format adapter``: the PEFT adapter in safetensors plus the tokenizer, loadable with plain peft.

``adapter_config.json`` names the base as the recipe did (``export/card.py``: ``portable_base``); the README that
peft writes is replaced by onecard's model card after the export is verified.
"""

from __future__ import annotations

from pathlib import Path


def write_adapter(ref, out: Path) -> list[str]:
    """Save the adapter (``adapter_model.safetensors`` + ``adapter_config.json``) and tokenizer into ``out``."""
    if ref.adapter_path is None:
        from onecard.errors import UserError

        raise UserError("this run trained all weights (method full): it has no adapter to export",
                        where=str(ref.run_dir), fix="use --format merged (a transformers directory) or --format gguf")
    from onecard.export.card import portable_base

    for config in ref.model.peft_config.values():  # else peft records the directory loaded (a GGUF's cache copy)
        config.base_model_name_or_path = portable_base(ref.recipe)
    ref.model.save_pretrained(str(out), safe_serialization=True)
    ref.tokenizer.save_pretrained(str(out))
    return sorted(p.name for p in out.iterdir())


def load_exported_adapter(out: Path, ref):
    """Reload the way a user would: a fresh base (float32, unquantised) + ``PeftModel.from_pretrained(out)``."""
    from peft import PeftModel

    from onecard.train.model import load_base

    source_recipe = ref.recipe.model_copy(update={"method": "lora",
                                                  "model": ref.recipe.model.model_copy(update={"dtype": "float32"}),
                                                  "quant": ref.recipe.quant.model_copy(update={"base": "none"})})
    base, _, _ = load_base(source_recipe, ref.device)
    model = PeftModel.from_pretrained(base, str(out))
    model.eval()
    return model
