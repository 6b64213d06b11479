"""``onecard export``: adapter / merged / gguf, each verified as it is written.

``export_run`` loads the trained model once as the float32 reference (see ``reference.py``), records its
logits on fixed prompts, writes the export, loads the export back the way its users will (plain peft,
transformers, transformers' GGUF loader) and compares logits. Then the model card (``README.md``, ``card.py``)
and the result -- files, errors, tolerance, pass/fail -- in ``<out>/export.json``; a failed comparison raises
:class:`ExportMismatch` after writing both.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from onecard.errors import UserError

FORMATS = ("adapter", "merged", "gguf")


class ExportMismatch(Exception):
    """The exported model's logits differ from the trained model's beyond tolerance."""

    def __init__(self, result: dict[str, Any]):
        self.result = result
        v = result["verification"]
        super().__init__(f"exported {result['format']} does not reproduce the trained model: {v['metric']} = "
                         f"{v['value']:.3g} > tolerance {v['tolerance']:.3g}")


def export_run(run_dir: str | Path, fmt: str, out: str | Path, *, dtype: str = "bfloat16", gguf_type: str = "f16",
               max_shard_size: str = "5GB", device: str | None = None, log=print) -> dict[str, Any]:
    from onecard.export.reference import adapter_effect, load_reference, merged_float32
    from onecard.export.verify import compare, fixed_inputs, judge, logits_on

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}", where="--format", fix=f"use one of {', '.join(FORMATS)}")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise UserError(f"unknown dtype {dtype!r}", where="--dtype", fix="use bfloat16, float16 or float32")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError("output directory is not empty", where=str(out), fix="choose a new --out directory")
    started = time.time()
    ref = load_reference(run_dir, device)
    model_config = ref.model.config  # for the model card: merged and gguf drop ref.model before verifying
    if fmt == "gguf":  # fail before any work on architectures we cannot write
        from onecard.export.gguf_writer import check_supported, tokenizer_pre

        check_supported(ref.model.config)
        tokenizer_pre(ref.tokenizer)
    inputs = fixed_inputs(ref.tokenizer)
    ref_logits = logits_on(ref.model, inputs)
    effect = adapter_effect(ref, inputs, ref_logits)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(ref.notes)

    if fmt == "adapter":
        from onecard.export.adapter import load_exported_adapter, write_adapter

        files, stored = write_adapter(ref, out), "float32"
        candidate = load_exported_adapter(out, ref)
    elif fmt == "merged":
        from onecard.export.merged import load_exported_merged, write_merged

        merged = merged_float32(ref)
        files, stored = write_merged(merged, ref.tokenizer, out, dtype, max_shard_size), dtype
        del merged, ref.model
        candidate = load_exported_merged(out, dtype, ref.device)
    else:
        from onecard.export.gguf_writer import STORED_DTYPE, write_gguf

        gguf_path = out / f"{ref.recipe.name}-{gguf_type}.gguf"
        merged = merged_float32(ref)
        info = write_gguf(merged, ref.tokenizer, gguf_path, gguf_type, name=ref.recipe.name)
        config = merged.config
        del merged, ref.model
        files, stored = [gguf_path.name], STORED_DTYPE[gguf_type]
        notes.append(f"GGUF: llama architecture, {info['tensors']} tensors, pre-tokenizer {info['tokenizer_pre']}"
                     + (", tied embeddings (no output.weight)" if info["tied_embeddings"] else ""))
        candidate = load_gguf_back(out, gguf_path.name, config, ref.device)
    log(f"wrote {', '.join(files)} to {out}; comparing logits with the trained model")
    errors = compare(ref_logits, logits_on(candidate, inputs))
    verification = judge(errors, stored)
    verification["adapter_effect_mean_abs"] = effect
    from onecard.export.card import write_model_card

    write_model_card(out, ref, model_config, fmt, files, verification)
    result = {"format": fmt, "run_dir": str(run_dir), "out": str(out),
              "files": sorted(set(files) | {"export.json", "README.md"}),
              "stored_dtype": stored, "method": ref.recipe.method, "base": ref.base_source, "notes": notes,
              "verification": verification, "seconds": round(time.time() - started, 2)}
    (out / "export.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not verification["passed"]:
        raise ExportMismatch(result)
    return result


def load_gguf_back(out: Path, filename: str, config, device: str):
    """transformers' GGUF loader dequantises to float32 and undoes the Q/K permutation.

    Llama 3.1 RoPE scaling is stored by llama.cpp as a ``rope_freqs`` tensor that transformers does not read
    back, so for that case only the original config is passed in.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if dict(rope).get("rope_type") == "llama3":
        kwargs["config"] = config
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=filename, dtype=torch.float32, **kwargs)
    model.to(device).eval()
    return model
