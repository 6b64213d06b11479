"""``build_dataset``: recipe + tokenizer -> tokenized, masked, truncated (and maybe packed) examples.

Reads top to bottom: read records -> split train/eval -> detect format -> tokenize (chat with
prompt masking, or text) -> truncate and drop -> pack -> stats. Everything is in memory: onecard
targets one GPU and datasets up to a few hundred thousand examples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from onecard.data.collate import epoch_order
from onecard.data.formats import detect_format, record_text, to_messages
from onecard.data.masking import IGNORE_INDEX, tokenize_chat
from onecard.data.packing import pack_examples, pack_pretrain
from onecard.data.records import Record, read_records
from onecard.data.templates import resolve_template
from onecard.errors import UserError

Example = dict[str, list[int]]
_EVAL_SPLIT_EPOCH = -1  # the eval split draws from its own (seed, -1) stream, never an epoch's


@dataclass
class DataStats:
    """Counts reported to the user. ``trained_tokens`` = label positions that enter the loss
    (labels[1:] != -100, the causal shift), i.e. the denominator of the token-mean loss."""

    records: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated_at: list[str] = field(default_factory=list)  # "file:line" of each truncated record
    dropped_at: list[str] = field(default_factory=list)    # "file:line" of each dropped record

    def note_truncated(self, where: str) -> None:
        self.truncated += 1
        self.truncated_at.append(where)

    def note_dropped(self, where: str) -> None:
        self.dropped += 1
        self.dropped_at.append(where)

    def as_dict(self) -> dict:
        """The counts, and the first ``SHOWN_WHERE`` places of each kind (a summary, not a data dump)."""
        out = asdict(self)
        out["truncated_at"], out["dropped_at"] = self.truncated_at[:SHOWN_WHERE], self.dropped_at[:SHOWN_WHERE]
        return out


SHOWN_WHERE = 20


@dataclass
class TokenizedDataset:
    examples: list[Example] = field(default_factory=list)
    stats: DataStats = field(default_factory=DataStats)
    format: str = ""

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


def select_records(recipe, split: str) -> list[Record]:
    """The records of a split: ``data.eval_path`` if given, else a seeded ``data.eval_fraction`` of ``data.path``."""
    data = recipe.data
    if split == "eval" and data.eval_path:
        return read_records(data.eval_path)
    if split == "eval" and not data.eval_fraction:
        return []
    if not data.path:
        raise UserError("no training data given", where="data.path", fix="set data.path to a .jsonl/.json/.parquet/.csv file")
    records = read_records(data.path)
    if data.eval_path or not data.eval_fraction:
        return records
    n_eval = max(1, round(len(records) * data.eval_fraction))
    if n_eval >= len(records):
        raise UserError(
            f"data.eval_fraction={data.eval_fraction} leaves no training records out of {len(records)}",
            where="data.eval_fraction",
            fix="lower data.eval_fraction, add records, or give a separate data.eval_path",
        )
    order = epoch_order(len(records), recipe.training.seed, _EVAL_SPLIT_EPOCH)
    chosen = sorted(order[:n_eval]) if split == "eval" else sorted(order[n_eval:])
    return [records[i] for i in chosen]


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


def _nothing_to_train(recipe, records: list[Record], stats: DataStats, split: str) -> UserError:
    return UserError(
        f"nothing left to train on in the {split} data: all {stats.records} examples were dropped "
        f"({stats.truncated} were longer than data.seq_len={recipe.data.seq_len} and lost every trained token)",
        where=records[0].path,
        fix=f"raise data.seq_len (e.g. --set data.seq_len={recipe.data.seq_len * 4}), or shorten the prompts; "
        "examples need at least one assistant message",
    )
