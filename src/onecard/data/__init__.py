"""Data: loading with file:line errors, formats, chat templates, prompt masking, packing, batching.

Public API (the trainer and the preference-data code build on these):
``build_dataset(recipe, tokenizer, split)``, ``collate(examples, pad_id)``, ``epoch_order(n, seed, epoch)``,
``model_inputs(batch)``, ``read_records(path)``, ``check_template_masking(tokenizer, template)``, ``pad_token_id(tokenizer)``,
``read_stats(path)`` (statistics of the newest prepared data of a file, for the planner: no tokenizer, no torch).
No torch import at module level: torch is imported inside the functions that build tensors.
"""

from __future__ import annotations

from onecard.data.cache import read_stats
from onecard.data.collate import collate, epoch_order, model_inputs
from onecard.data.dataset import DataStats, TokenizedDataset, build_dataset, select_records
from onecard.data.formats import detect_format, to_messages
from onecard.data.masking import IGNORE_INDEX, check_template_masking, tokenize_chat
from onecard.data.records import Record, read_records
from onecard.data.templates import BUILTIN_TEMPLATES, render, resolve_template

__all__ = [
    "BUILTIN_TEMPLATES",
    "DataStats",
    "IGNORE_INDEX",
    "Record",
    "TokenizedDataset",
    "build_dataset",
    "check_template_masking",
    "collate",
    "detect_format",
    "epoch_order",
    "model_inputs",
    "pad_token_id",
    "read_records",
    "read_stats",
    "render",
    "resolve_template",
    "select_records",
    "to_messages",
    "tokenize_chat",
]


def pad_token_id(tokenizer) -> int:
    """The id used to pad: the tokenizer's pad token, else EOS (Llama 3 ships no pad token), else 0.
    Pads never reach the loss (labels -100) or attention (mask 0), so the choice is safe."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
