"""``--format merged``: adapter folded into the base, written as a standard transformers directory.

Merging happens in float32 (``merge_and_unload`` on the fp32 reference) and only the result is rounded to the
stored dtype (bf16 by default), so the export carries one rounding, not two.
"""

from __future__ import annotations

from pathlib import Path


def write_merged(merged_model, tokenizer, out: Path, dtype: str = "bfloat16", max_shard_size: str = "5GB") -> list[str]:
    import torch

    merged_model.to(getattr(torch, dtype))
    merged_model.config.dtype = dtype
    merged_model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(out))
    return sorted(p.name for p in out.iterdir())


def load_exported_merged(out: Path, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=getattr(torch, dtype)).to(device)
    model.eval()
    return model
