"""Rows that are each one whole causal sequence, told to transformers so that it builds no attention mask.

For a batch of only input_ids (no attention_mask, no position_ids) every row is one causal sequence from position
0, and sdpa needs no mask: ``is_causal=True`` picks its flash kernel. Eager transformers finds that out by looking
at the data on the host (``masking_utils._ignore_causal_mask_sdpa``, ``find_packed_sequence_indices``). While a CUDA
graph is being recorded it cannot look (``is_tracing`` includes a capturing stream), so it builds the full
(B, 1, S, S) block-causal mask instead: a dense masked attention, and a mask the graph then holds.

The trap this avoids: transformers skips mask building for an attention implementation it has no mask function
for, and sdpa with no mask is causal only through ``is_causal``. So the alias must be sdpa's own function (eager
attention with no mask would attend to the future), and only batches that carry no mask and no position ids may
run under it -- a padded or packed batch would silently lose its mask. ``refusal`` names both.
"""

from __future__ import annotations

from contextlib import contextmanager

ALIAS = "onecard_sdpa_unmasked"  # an attention implementation transformers knows no mask function for


def _configs(model) -> list:
    """Every distinct transformers config the model's modules read ``_attn_implementation`` from."""
    from transformers import PreTrainedConfig

    seen: dict[int, object] = {}
    for module in model.modules():
        config = module.__dict__.get("config")
        if isinstance(config, PreTrainedConfig):
            seen.setdefault(id(config), config)
    return list(seen.values())


def refusal(model, batch: dict) -> str | None:
    """Why ``model`` may not run ``batch`` (input_ids, labels) without a mask, or None when it may."""
    extra = sorted(set(batch) & {"attention_mask", "position_ids"})
    if extra:
        return (f"the batch carries {', '.join(extra)}: only rows that are each one whole causal sequence "
                "(input_ids and labels) may run without a mask")
    configs = _configs(model)
    others = sorted({c._attn_implementation for c in configs} - {"sdpa"})
    if others or not configs:
        return (f"attention implementation {others or 'unknown'}: running without a mask needs sdpa, whose "
                "is_causal flag then keeps the rows causal")
    seq = batch["input_ids"].shape[-1]
    for config in configs:  # transformers configs differ by family: read what a family may have
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and seq > window:
            return (f"a sliding window of {window} tokens, shorter than the rows' {seq}: only the mask transformers "
                    "builds holds the window")
    return None


@contextmanager
def causal_rows_without_mask(model, batch: dict):
    """Inside, ``model`` runs sdpa with ``is_causal=True`` and no mask, and transformers builds none.
    Raises ValueError where ``refusal`` names a reason."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    reason = refusal(model, batch)
    if reason:
        raise ValueError(reason)
    configs = _configs(model)
    AttentionInterface.register(ALIAS, sdpa_attention_forward)
    for config in configs:
        config._attn_implementation = ALIAS
    try:
        yield
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"
