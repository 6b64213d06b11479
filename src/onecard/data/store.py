"""A prepared split on disk, and the rows the trainer reads from it.

The entry holds the tokenised examples as memory-mapped Arrow (``datasets`` wrote them), the kept example
numbers (``keep.npy``: dropped examples stay in the store, for the statistics) and, for packing, the row
bounds (``bounds.npy``). Rows are assembled on access by the same functions the in-memory packing uses
(:mod:`onecard.data.packing`), so the trainer's RSS does not grow with the data: only the rows of the current
batch are ever turned into Python lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onecard.data.packing import pack_bounds, packed_row, pretrain_block, pretrain_block_count
from onecard.data.stats import SHOWN_WHERE, summarize
from onecard.errors import UserError




def finish_store(store, recipe, split: str, fmt: str, files: list[str], build: Path, phases,
                 where=None) -> dict[str, Any]:
    """Drop, pack and count what ``datasets.map`` wrote; raises the first record error in file order.
    ``where(i)``: the place (file:line) of the i-th record, for the first truncated and dropped ones."""
    import numpy as np

    seq_len = recipe.data.seq_len
    table = store.data
    n_tokens = table.column("n_tokens").to_numpy()
    meta: dict[str, Any] = {"format": fmt, "files": files, "seq_len": seq_len, "records": len(n_tokens)}
    if recipe.task == "pretrain":
        import pyarrow.compute as pc

        stream_tokens = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)
        blocks = pretrain_block_count(stream_tokens, seq_len)
        if not blocks:
            raise UserError("the text records hold too few tokens to form a training block", where=str(recipe.data.path),
                            fix="add text, or lower data.seq_len")
        lengths = np.minimum(seq_len, stream_tokens - seq_len * np.arange(blocks, dtype=np.int64))
        meta.update(kind="pretrain", rows=blocks, stream_tokens=stream_tokens)
        meta["summary"] = summarize(n_tokens, lengths, lengths - 1, seq_len, packing=True, dropped=int((n_tokens == 0).sum()),
                                    rows=lengths)
        meta["summary"]["truncated"] = 0  # long documents span blocks; nothing is cut off
        _name_places(meta["summary"], where, [], np.flatnonzero(n_tokens == 0))
        return meta
    _raise_first_error(table)
    trained = table.column("trained").to_numpy()
    keep = np.flatnonzero(trained > 0)
    if not len(keep):
        raise _nothing_to_train(recipe, split, len(n_tokens), int((n_tokens > seq_len).sum()))
    kept_lengths = np.minimum(n_tokens[keep], seq_len)
    np.save(build / "keep.npy", keep)
    packing = bool(recipe.data.packing and split == "train")  # eval stays unpacked: exact per-example loss
    advance = phases.bar("packing", len(keep))
    bounds = np.asarray(pack_bounds(kept_lengths.tolist(), seq_len), dtype=np.int64)
    advance(len(keep))
    row_lengths = np.add.reduceat(kept_lengths, bounds[:-1])
    if packing:
        np.save(build / "bounds.npy", bounds)
    meta.update(kind="packed" if packing else "examples", rows=int(len(bounds) - 1 if packing else len(keep)))
    meta["summary"] = summarize(n_tokens, kept_lengths, trained[keep], seq_len, packing=packing,
                                dropped=int(len(n_tokens) - len(keep)), rows=row_lengths)
    _name_places(meta["summary"], where, np.flatnonzero(n_tokens > seq_len), np.flatnonzero(trained == 0))
    return meta


def _name_places(summary: dict[str, Any], where, truncated, dropped) -> None:
    if where is not None:
        summary["truncated_at"] = [where(int(i)) for i in truncated[:SHOWN_WHERE]]
        summary["dropped_at"] = [where(int(i)) for i in dropped[:SHOWN_WHERE]]


def _raise_first_error(table) -> None:
    import json

    import pyarrow.compute as pc

    errors = table.column("error")
    if errors.null_count == len(errors):
        return
    first = pc.index(pc.is_valid(errors), True).as_py()
    what, where, fix = json.loads(errors[first].as_py())
    raise UserError(what, where=where, fix=fix)


def _nothing_to_train(recipe, split: str, records: int, truncated: int) -> UserError:
    return UserError(
        f"nothing left to train on in the {split} data: all {records} examples were dropped "
        f"({truncated} were longer than data.seq_len={recipe.data.seq_len} and lost every trained token)",
        where=recipe.data.eval_path if split == "eval" and recipe.data.eval_path else recipe.data.path,
        fix=f"raise data.seq_len (e.g. --set data.seq_len={recipe.data.seq_len * 4}), or shorten the prompts; "
        "examples need at least one assistant message",
    )


def open_rows(entry: Path, meta: dict[str, Any]) -> Sequence:
    """The trainer's rows of a published entry, memory-mapped.

    The Arrow files ``datasets.map`` wrote are read with pyarrow itself (the IPC stream format datasets' ArrowWriter
    writes, memory-mapped as ``Dataset.from_file`` maps it): importing datasets (and pandas with it) would cost a
    cached launch ~0.7 s on this 2-core machine for nothing the rows use."""
    import numpy as np
    import pyarrow as pa

    table = pa.concat_tables([pa.ipc.open_stream(pa.memory_map(str(entry / f))).read_all() for f in meta["files"]])
    if meta["kind"] == "pretrain":
        return PretrainBlocks(table.column("input_ids"), meta["seq_len"], meta["rows"])
    keep = np.load(entry / "keep.npy")
    bounds = np.load(entry / "bounds.npy") if meta["kind"] == "packed" else None
    return ExampleRows(table, keep, bounds)


class _Rows(Sequence):
    """Indexable by int (a dict of lists) or slice (a list of them), like the list of dicts it replaces."""

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.row(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.row(index)

    def __add__(self, other) -> list:  # ``examples + [...]`` as with the list this replaces
        return list(self) + list(other)

    def __radd__(self, other) -> list:
        return list(other) + list(self)


class ExampleRows(_Rows):
    """SFT examples (kept ones only), or packed rows of consecutive kept examples when ``bounds`` is given."""

    def __init__(self, table, keep, bounds=None):
        self._ids, self._labels = table.column("input_ids"), table.column("labels")
        self._keep, self._bounds = keep, bounds

    def __len__(self) -> int:
        return len(self._keep) if self._bounds is None else len(self._bounds) - 1

    def example(self, k: int) -> dict[str, list[int]]:
        j = int(self._keep[k])
        return {"input_ids": self._ids[j].as_py(), "labels": self._labels[j].as_py()}

    def row(self, i: int) -> dict[str, list[int]]:
        if self._bounds is None:
            return self.example(i)
        return packed_row([self.example(k) for k in range(int(self._bounds[i]), int(self._bounds[i + 1]))])

    def lengths(self):
        """Tokens of every row (numpy), read from the Arrow list offsets: no row is materialised."""
        import numpy as np
        import pyarrow.compute as pc

        per_record = np.concatenate([pc.list_value_length(c).to_numpy(zero_copy_only=False) for c in self._ids.chunks])
        per_example = per_record[self._keep]
        if self._bounds is None:
            return per_example
        ends = np.concatenate([[0], np.cumsum(per_example)])
        return ends[self._bounds[1:]] - ends[self._bounds[:-1]]


class PretrainBlocks(_Rows):
    """``seq_len`` blocks cut from the concatenated documents (each already ending in EOS)."""

    def __init__(self, ids_column, seq_len: int, blocks: int):
        import pyarrow as pa

        self._stream = pa.chunked_array([chunk.flatten() for chunk in ids_column.chunks], type=pa.int32())
        self._seq_len, self._blocks = seq_len, blocks

    def __len__(self) -> int:
        return self._blocks

    def row(self, i: int) -> dict[str, list[int]]:
        return pretrain_block(self._stream.slice(i * self._seq_len, self._seq_len).to_pylist())

    def lengths(self):
        import numpy as np

        starts = np.arange(self._blocks, dtype=np.int64) * self._seq_len
        return np.minimum(self._seq_len, len(self._stream) - starts)  # the last block may be short


def row_lengths(rows) -> list[int]:
    """Tokens per training row: from the store's offsets for cached rows, else counted (in-memory lists)."""
    if isinstance(rows, _Rows):
        return [int(n) for n in rows.lengths()]
    return [row_token_count(row) for row in rows]


def row_token_count(example: dict) -> int:
    """Tokens of one model row: an SFT/pretrain example, or a preference example's prompt + longest completion."""
    if "input_ids" in example:
        return len(example["input_ids"])
    completions = [len(v) for k, v in example.items() if k.endswith("_ids") and k != "prompt_ids"]
    return len(example.get("prompt_ids", [])) + max(completions, default=0)
