"""The trained model as the reference every export is checked against.

Adapters are put on the base loaded *unquantised* in float32 from its original directory: for QLoRA runs
this is the dequantisation the merged and GGUF exports need (merging into NF4 codes is not possible), and
fp32 keeps the reference free of rounding so the measured error is the export's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Reference:
    model: Any  # PeftModel (adapter runs) or the fine-tuned model (full runs), float32, eval mode
    tokenizer: Any
    recipe: Any
    run_dir: Path
    adapter_path: Path | None
    base_source: str
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"


def load_reference(run_dir: str | Path, device: str | None = None) -> Reference:
    from onecard.eval.runs import read_run_recipe, run_weights
    from onecard.train.model import load_base, resolve_device

    run_dir = Path(run_dir)
    recipe = read_run_recipe(run_dir)
    adapter, full = run_weights(run_dir, recipe)
    device = resolve_device(device)
    notes: list[str] = []
    source_recipe = recipe.model_copy(update={
        "method": "lora" if adapter is not None else "full",  # qlora -> load the base unquantised
        "model": recipe.model.model_copy(update={"dtype": "float32",
                                                  **({} if adapter is not None else {"name_or_path": str(full)})}),
        "quant": recipe.quant.model_copy(update={"base": "none"}),  # an FP8 base -> the checkpoint's own weights
    })
    if recipe.quant.base == "fp8":
        notes.append(f"FP8-base run: the adapter was applied to the original weights of {recipe.model.name_or_path} "
                     "(float32), not to their e4m3 rounding it was trained on")
    if recipe.method == "qlora":
        notes.append(f"QLoRA run: the 4-bit base was not used; the adapter was applied to the original "
                     f"unquantised weights of {recipe.model.name_or_path} (dequantised base, float32)")
    model, tokenizer, source = load_base(source_recipe, device)
    if adapter is not None:
        from peft import PeftModel
        from transformers import AutoTokenizer

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        if (adapter / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    model.eval()
    return Reference(model, tokenizer, recipe, run_dir, adapter, source, notes, device)


def merged_float32(ref: Reference):
    """The reference with its adapter folded in (``merge_and_unload``), still float32; full runs as they are."""
    if ref.adapter_path is None:
        return ref.model
    return ref.model.merge_and_unload()


def base_logits(ref: Reference, inputs):
    """Logits with the adapter switched off (None for full runs): what the export must differ from."""
    if ref.adapter_path is None:
        return None
    from onecard.export.verify import logits_on

    with ref.model.disable_adapter():
        return logits_on(ref.model, inputs)
