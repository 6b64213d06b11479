"""docs/data-formats.md: every example it shows is read by onecard's data reader as the format it claims.

Each example is a fenced block after ``<!-- example: task=T format=F file=NAME -->``; it is written to NAME and
built into a dataset for task T with a tiny model's tokenizer, exactly as ``onecard train`` reads ``data.path``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "data-formats.md"
EXAMPLE = re.compile(r"<!-- example: task=(\w+) format=(\w+) file=([\w.-]+)(?: chat_template=([\w.-]+))? -->"
                     r"\s*```\w*\n(.*?)```", re.S)
FORMATS = ("chat", "sharegpt", "alpaca", "text", "dpo", "kto")


def documented_examples() -> list[tuple[str, str, str, str, str]]:
    """``(task, format, file name, chat template or "", body)`` of each example."""
    return EXAMPLE.findall(DOC.read_text(encoding="utf-8"))


def _build(path: Path, task: str, model_dir: str, chat_template: str = ""):
    from transformers import AutoTokenizer

    from onecard.data import build_dataset
    from onecard.data.preference import build_preference_dataset
    from onecard.recipe import validate_recipe

    recipe = validate_recipe({"name": "doc", "model": {"name_or_path": model_dir}, "task": task,
                              "data": {"path": str(path), "seq_len": 512, "chat_template": chat_template or "auto"},
                              "output_dir": str(path.parent / "run")})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if task in ("dpo", "kto"):
        return build_preference_dataset(recipe, tokenizer)
    return build_dataset(recipe, tokenizer)


def test_every_format_is_documented_with_an_example():
    examples = documented_examples()
    assert {fmt for _, fmt, _, _, _ in examples} == set(FORMATS)
    assert {Path(name).suffix for _, _, name, _, _ in examples} >= {".jsonl", ".json", ".csv"}
    assert "docs/data-formats.md" in (DOC.parents[1] / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("task,fmt,name,template,body", documented_examples(), ids=[e[2] for e in documented_examples()])
def test_documented_example_parses(task, fmt, name, template, body, tmp_path, tiny_llama_dir):
    from onecard.data import read_records
    from onecard.data.formats import record_format

    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    records = read_records(path)
    assert records and all(record_format(r) == fmt for r in records)
    dataset = _build(path, task, tiny_llama_dir, template)
    assert dataset.stats.records == len(records) and dataset.stats.dropped == 0 and dataset.stats.truncated == 0
    assert dataset.stats.trained_tokens > 0
    if task in ("sft", "pretrain"):
        assert dataset.format == fmt
    if task == "sft":
        assert len(dataset.examples) == len(records)


def test_documented_parquet_recipe_reads_the_chat_example(tmp_path, tiny_llama_dir):
    """The page's one-liner for Parquet (``Dataset.from_list(records).to_parquet``) gives a file onecard reads."""
    import datasets

    from onecard.data import read_records

    _, _, name, _, body = next(e for e in documented_examples() if e[1] == "chat" and e[2].endswith(".jsonl"))
    jsonl = tmp_path / name
    jsonl.write_text(body, encoding="utf-8")
    records = [r.data for r in read_records(jsonl)]
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "chat.parquet"))
    dataset = _build(tmp_path / "chat.parquet", "sft", tiny_llama_dir)
    assert dataset.format == "chat" and len(dataset.examples) == len(records)
