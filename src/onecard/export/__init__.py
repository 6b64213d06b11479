"""``onecard export``: adapter / merged / gguf, each verified as it is written.

``export_run`` loads the trained model once as the float32 reference (see ``reference.py``), records its
logits on fixed prompts, writes the export, loads the export back the way its users will (plain peft,
transformers, transformers' GGUF loader, or llama.cpp itself for quantised GGUF types and architectures
transformers cannot read: ``gguf_quant.verifier_for``) and compares logits. Then the model card (``README.md``, ``card.py``)
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
    from onecard.export.reference import base_logits, load_reference, merged_float32
    from onecard.export.verify import adapter_check, compare, fixed_inputs, judge, logits_on

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}", where="--format", fix=f"use one of {', '.join(FORMATS)}")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise UserError(f"unknown dtype {dtype!r}", where="--dtype", fix="use bfloat16, float16 or float32")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError("output directory is not empty", where=str(out), fix="choose a new --out directory")
    if fmt == "gguf":
        from onecard.export.gguf_quant import check_gguf_type

        check_gguf_type(gguf_type)
    started = time.time()
    ref = load_reference(run_dir, device)
    model_config = ref.model.config  # for the model card: merged and gguf drop ref.model before verifying
    if fmt == "gguf":  # fail before any work on architectures we cannot write or types we cannot check
        from onecard.export.gguf_quant import verifier_for
        from onecard.export.gguf_writer import check_supported, tokenizer_pre

        check_supported(ref.model.config)
        tokenizer_pre(ref.tokenizer)
        gguf_verifier = verifier_for(ref.model.config.model_type, gguf_type)
    inputs = fixed_inputs(ref.tokenizer)
    ref_logits = logits_on(ref.model, inputs)
    base = base_logits(ref, inputs)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(ref.notes)

    verifier = "transformers"
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
        verifier = gguf_verifier
        files, stored, candidate = _export_gguf(ref, out, gguf_type, verifier, notes)
    log(f"wrote {', '.join(files)} to {out}; comparing {verifier}'s logits with the trained model's")
    if verifier == "llama.cpp":
        from onecard.export.gguf_quant import llamacpp_logits

        candidate_logits = llamacpp_logits(candidate, inputs)
    else:
        candidate_logits = logits_on(candidate, inputs)
    verification = judge(compare(ref_logits, candidate_logits), stored, runtime=verifier)
    verification.update(adapter_check(ref_logits, base, candidate_logits))
    if verification.get("nearer_tuned_than_base") is False:
        notes.append("the export's logits are nearer the base model's than the tuned model's: the adapter's effect "
                     f"({verification['adapter_effect_mean_abs']:.3g} mean |Δlogit|) is lost in the {stored} rounding")
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


def _export_gguf(ref, out: Path, gguf_type: str, verifier: str, notes: list[str]):
    """Write the GGUF and its Modelfile; returns (files, stored dtype, what to verify: a model or the file)."""
    from onecard.export.gguf_quant import STORED_DTYPE
    from onecard.export.reference import merged_float32

    merged = merged_float32(ref)
    gguf_path, info = _write_gguf_file(merged, ref, out, gguf_type)
    config = merged.config
    del merged
    ref.model = None  # free the float32 reference before loading the export back
    notes.append(f"GGUF: {info['architecture']} architecture, {info['tensors']} tensors, pre-tokenizer "
                 f"{info['tokenizer_pre']}" + (", tied embeddings (no output.weight)" if info["tied_embeddings"] else "")
                 + f"; checked in {verifier}")
    files = [gguf_path.name] + _write_modelfile(out, gguf_path, ref, notes)
    candidate = gguf_path if verifier == "llama.cpp" else load_gguf_back(out, gguf_path.name, config, ref.device)
    return files, STORED_DTYPE[gguf_type], candidate


def _write_gguf_file(merged, ref, out: Path, gguf_type: str):
    """``<name>-<type>.gguf``: written directly, or (q4_k_m) written f16 then quantised by llama.cpp."""
    from onecard.export.gguf_writer import FILE_TYPES, write_gguf

    path = out / f"{ref.recipe.name}-{gguf_type}.gguf"
    if gguf_type in FILE_TYPES:
        return path, write_gguf(merged, ref.tokenizer, path, gguf_type, name=ref.recipe.name)
    from onecard.export.gguf_quant import llama_quantize

    source = out / f".{ref.recipe.name}-f16.gguf.tmp"
    info = write_gguf(merged, ref.tokenizer, source, "f16", name=ref.recipe.name)
    try:
        llama_quantize(source, path, gguf_type)
    finally:
        source.unlink(missing_ok=True)
    return path, {**info, "file_type": gguf_type}


def _write_modelfile(out: Path, gguf_path: Path, ref, notes: list[str]) -> list[str]:
    """An Ollama ``Modelfile`` beside the GGUF (``ollama.py``); its notes say what it could not translate."""
    from onecard.export.ollama import write_modelfile

    path, modelfile_notes = write_modelfile(out, gguf_path.name, ref.tokenizer, ref.recipe)
    notes.extend(modelfile_notes)
    return [path.name]


def load_gguf_back(out: Path, filename: str, config, device: str):
    """transformers' GGUF loader dequantises to float32 and undoes the Q/K permutation and Gemma's norm offset.

    Two things llama.cpp reads that transformers' reader does not, so for those cases the original config is
    passed in and only the tensors come from the file: Llama 3.1 RoPE scaling (llama.cpp's ``rope_freqs``
    tensor) and Gemma 2's ``query_pre_attn_scalar`` and soft-capping (its reader keeps the defaults).
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if dict(rope).get("rope_type") == "llama3" or config.model_type == "gemma2":
        kwargs["config"] = config
    if config.model_type == "gemma2":  # soft-capped attention has no SDPA path in transformers
        kwargs["attn_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=filename, dtype=torch.float32, **kwargs)
    model.to(device).eval()
    return model
