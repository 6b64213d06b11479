"""Today's in-memory data path, verbatim from commit 4bcc319 (before the Arrow cache), as the reference the cached
path is tested against (tests/test_data_cache.py). Only the imports differ; do not "fix" this file."""

from __future__ import annotations

from dataclasses import dataclass, field

from onecard.data.dataset import DataStats, select_records
from onecard.data.formats import detect_format, record_text, to_messages
from onecard.data.masking import IGNORE_INDEX, _label_by_pieces, assistant_spans
from onecard.data.records import Record
from onecard.data.templates import resolve_template
from onecard.errors import UserError

Example = dict[str, list[int]]
Span = tuple[int, int]


@dataclass
class TokenizedDataset:
    examples: list[Example] = field(default_factory=list)
    stats: DataStats = field(default_factory=DataStats)
    format: str = ""
    summary: dict = field(default_factory=dict)  # statistics the trainer reports (none on this reference path)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def build_dataset(recipe, tokenizer, split: str = "train") -> TokenizedDataset:
    """Tokenized examples of ``split`` ("train" or "eval"); an eval split that is not configured is empty."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if recipe.task in ("dpo", "kto"):
        raise ValueError("build_dataset handles sft/pretrain; preference tasks have their own builder")
    records = select_records(recipe, split)
    if not records:
        return TokenizedDataset()
    fmt = detect_format(records, recipe.data.format, recipe.task)
    seq_len = recipe.data.seq_len
    if recipe.task == "pretrain":
        return _pretrain(records, tokenizer, seq_len, fmt)
    stats = DataStats(records=len(records))
    examples = []
    template = resolve_template(tokenizer, recipe.data.chat_template) if fmt in ("chat", "alpaca") else None
    for record in records:
        ids, labels = _tokenize_sft(record, fmt, tokenizer, template)
        if len(ids) > seq_len:
            stats.note_truncated(record.where)
            ids, labels = ids[:seq_len], labels[:seq_len]
        if _count_trained(labels) == 0:
            stats.note_dropped(record.where)
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise _nothing_to_train(recipe, records, stats, split)
    if recipe.data.packing and split == "train":  # eval stays unpacked: exact per-example loss on any attention path
        examples = pack_examples(examples, seq_len)
    stats.tokens = sum(len(ex["input_ids"]) for ex in examples)
    stats.trained_tokens = sum(_count_trained(ex["labels"]) for ex in examples)
    return TokenizedDataset(examples, stats, fmt)


def _tokenize_sft(record: Record, fmt: str, tokenizer, template: str | None) -> tuple[list[int], list[int]]:
    if fmt == "text":  # SFT on raw text trains every token, ending with EOS
        ids = _encode_text(tokenizer, record_text(record))
        return ids, [IGNORE_INDEX] + ids[1:]
    messages = to_messages(record, fmt)
    if not any(m["role"] == "assistant" for m in messages):
        return [], []  # nothing to learn from; counted as dropped
    return tokenize_chat(tokenizer, template, messages, where=record.where)


def _encode_text(tokenizer, text: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def _pretrain(records: list[Record], tokenizer, seq_len: int, fmt: str) -> TokenizedDataset:
    docs = [list(tokenizer(record_text(r), add_special_tokens=True)["input_ids"]) for r in records]
    blocks = pack_pretrain(docs, seq_len, tokenizer.eos_token_id)
    stats = DataStats(records=len(records))
    for record, doc in zip(records, docs):
        if not doc:
            stats.note_dropped(record.where)
    if not blocks:
        raise UserError(
            "the text records hold too few tokens to form a training block",
            where=records[0].path,
            fix="add text, or lower data.seq_len",
        )
    stats.tokens = sum(len(b["input_ids"]) for b in blocks)
    stats.trained_tokens = sum(_count_trained(b["labels"]) for b in blocks)
    return TokenizedDataset(blocks, stats, fmt)


def _count_trained(labels: list[int]) -> int:
    return sum(1 for tok in labels[1:] if tok != IGNORE_INDEX)


def tokenize_chat(tokenizer, template: str, messages: list[dict], where: str | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation; labels are IGNORE_INDEX outside assistant spans."""
    try:
        full, spans = assistant_spans(tokenizer, template, messages, where=where)
    except UserError as exc:  # a template refusing *this* conversation: point at the record
        if where and exc.where == "data.chat_template":
            raise UserError(exc.what, where=where, fix=exc.fix) from None
        raise
    if getattr(tokenizer, "is_fast", False):
        ids, trained = _label_by_offsets(tokenizer, full, spans)
    else:  # slow tokenizers give no offsets: tokenize span by span instead
        ids, trained = _label_by_pieces(tokenizer, full, spans)
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, trained)]
    if labels:
        labels[0] = IGNORE_INDEX  # position 0 is never predicted by a causal LM
    return ids, labels


def _label_by_offsets(tokenizer, text: str, spans: list[Span]) -> tuple[list[int], list[bool]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    trained, j = [], 0
    for s, e in offsets:  # offsets and spans are both sorted: one pass
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        overlaps = j < len(spans) and (e > spans[j][0] or (s == e and s >= spans[j][0]))
        trained.append(overlaps)
    return ids, trained


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


def _nothing_to_train(recipe, records: list[Record], stats: DataStats, split: str) -> UserError:
    return UserError(
        f"nothing left to train on in the {split} data: all {stats.records} examples were dropped "
        f"({stats.truncated} were longer than data.seq_len={recipe.data.seq_len} and lost every trained token)",
        where=records[0].path,
        fix=f"raise data.seq_len (e.g. --set data.seq_len={recipe.data.seq_len * 4}), or shorten the prompts; "
        "examples need at least one assistant message",
    )
