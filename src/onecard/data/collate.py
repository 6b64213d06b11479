"""Batching: the epoch's example order, and padding a micro-batch.

The order is a pure function of (seed, epoch) from a private generator, never the global RNG, so
a resumed run -- which restores the global RNG to wherever it was -- still sees the same batches,
and evaluation or dropout drawing random numbers cannot shift the data order.
"""

from __future__ import annotations

import hashlib

from onecard.data.masking import IGNORE_INDEX


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order in which epoch ``epoch`` visits ``range(num_examples)``."""
    if not shuffle:
        return list(range(num_examples))
    import torch

    generator = torch.Generator(device="cpu")
    generator.manual_seed(_mix(seed, epoch))
    return torch.randperm(num_examples, generator=generator).tolist()


def _mix(seed: int, epoch: int) -> int:
    """One 63-bit seed from (seed, epoch): seed+epoch would make (1, 0) and (0, 1) collide."""
    digest = hashlib.sha256(f"onecard-data-order:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest example: ``input_ids``, ``attention_mask``, ``labels`` (-100 on pads),
    and ``position_ids`` when the examples carry them (packed rows; pads continue the count)."""
    import torch

    if not examples:
        raise ValueError("collate() needs at least one example")
    width = max(len(ex["input_ids"]) for ex in examples)
    with_positions = any("position_ids" in ex for ex in examples)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    if with_positions:
        batch["position_ids"] = []
    for ex in examples:
        n = len(ex["input_ids"])
        pad = width - n
        batch["input_ids"].append(list(ex["input_ids"]) + [pad_id] * pad)
        batch["attention_mask"].append([1] * n + [0] * pad)
        batch["labels"].append(list(ex["labels"]) + [IGNORE_INDEX] * pad)
        if with_positions:
            positions = list(ex.get("position_ids") or range(n))
            start = positions[-1] + 1 if positions else 0
            batch["position_ids"].append(positions + list(range(start, start + pad)))
    return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}


def model_inputs(batch: dict) -> dict:
    """The keyword arguments to hand a Hugging Face causal LM for a collated batch.

    Packed rows (``position_ids`` present) go *without* ``attention_mask``: transformers builds a
    block-diagonal mask from ``position_ids`` restarts only when no 2-D mask is given
    (``masking_utils.find_packed_sequence_indices``); with the mask it would let packed examples
    attend to each other. Right padding is harmless then: causal attention never lets a real token
    see the pads after it, and pads carry labels -100. ``use_cache=False`` because that detection is
    also skipped whenever a KV cache exists (eval-mode models create one by default).
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
