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
        stream.extend(doc)
        if eos_id is not None and (not doc or doc[-1] != eos_id):
            stream.append(eos_id)
    blocks = []
    for start in range(0, len(stream), seq_len):
        block = stream[start : start + seq_len]
        if len(block) >= 2:  # a 1-token block predicts nothing
            blocks.append({"input_ids": block, "labels": list(block)})
    return blocks


def pack_examples(examples: list[Example], seq_len: int) -> list[Example]:
    """Greedy in-order packing of SFT examples (each already <= ``seq_len``) into rows of at most ``seq_len``.

    In order rather than best-fit so the packed rows are a pure function of the data file and the
    epoch shuffle then permutes rows; best-fit would waste less of each row (not measured yet).
    """
    rows: list[Example] = []
    row: Example = _empty_row()
    for example in examples:
        n = len(example["input_ids"])
        if row["input_ids"] and len(row["input_ids"]) + n > seq_len:
            rows.append(row)
            row = _empty_row()
        labels = list(example["labels"])
        labels[0] = IGNORE_INDEX  # never predicted from the previous example's last token
        row["input_ids"] += example["input_ids"]
        row["labels"] += labels
        row["position_ids"] += list(range(n))
    if row["input_ids"]:
        rows.append(row)
    return rows


def _empty_row() -> Example:
    return {"input_ids": [], "labels": [], "position_ids": []}
