"""Packing: pre-training blocks, and several SFT examples per row with per-example ``position_ids``.

Pre-training concatenates documents (each followed by EOS) and cuts ``seq_len`` blocks, the
standard recipe (GPT-2/nanoGPT); documents may attend across the EOS within a block.

SFT packing must not let an example see or predict across its neighbour: ``position_ids`` restart
at 0 at each example start (a varlen/flex attention path turns those restarts into block-diagonal
masks), and the first label of each example is masked, since otherwise the last token of the
previous example would be trained to predict it.
"""

from __future__ import annotations

from onecard.data.masking import IGNORE_INDEX

Example = dict[str, list[int]]


def pack_pretrain(token_docs: list[list[int]], seq_len: int, eos_id: int | None) -> list[Example]:
    """Concatenate documents (+EOS each) and cut into ``seq_len`` blocks; the last block may be shorter."""
    stream: list[int] = []
    for doc in token_docs:
        stream.extend(with_eos(doc, eos_id))
    return [pretrain_block(stream[k * seq_len:(k + 1) * seq_len]) for k in range(pretrain_block_count(len(stream), seq_len))]


def with_eos(doc: list[int], eos_id: int | None) -> list[int]:
    return doc + [eos_id] if eos_id is not None and (not doc or doc[-1] != eos_id) else doc


def pretrain_block_count(stream_tokens: int, seq_len: int) -> int:
    """Blocks cut from a stream: a last block of 1 token predicts nothing and is left out."""
    full, rest = divmod(stream_tokens, seq_len)
    return full + (1 if rest >= 2 else 0)


def pretrain_block(tokens: list[int]) -> Example:
    return {"input_ids": tokens, "labels": list(tokens)}


def pack_examples(examples: list[Example], seq_len: int) -> list[Example]:
    """Greedy in-order packing of SFT examples (each already <= ``seq_len``) into rows of at most ``seq_len``.

    In order rather than best-fit so the packed rows are a pure function of the data file and the
    epoch shuffle then permutes rows; best-fit would waste less of each row (not measured yet).
    """
    bounds = pack_bounds([len(ex["input_ids"]) for ex in examples], seq_len)
    return [packed_row(examples[a:b]) for a, b in zip(bounds, bounds[1:])]


def pack_bounds(lengths, seq_len: int) -> list[int]:
    """Row k of the greedy packing holds examples ``bounds[k]:bounds[k+1]``."""
    bounds, used = [0], 0
    for k, n in enumerate(lengths):
        if used and used + n > seq_len:
            bounds.append(k)
            used = 0
        used += n
    if used:
        bounds.append(len(lengths))
    return bounds


def packed_row(examples: list[Example]) -> Example:
    """One row of several examples: positions restart at 0 per example, and each example's first label is
    masked, never predicted from the previous example's last token."""
    row: Example = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        labels = list(example["labels"])
        labels[0] = IGNORE_INDEX
        row["input_ids"] += example["input_ids"]
        row["labels"] += labels
        row["position_ids"] += list(range(len(example["input_ids"])))
    return row
