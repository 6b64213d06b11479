"""The cached, memory-mapped data path against today's in-memory one (tests/data_reference.py), and the cache.

Identity: the same tokens, labels, position ids and statistics for every format, packing on and off, truncation
and drops, eval splits, in one process and in worker processes; exactly the same losses after 5 training steps.
Cache: a second build reads the entry without tokenising; a changed file, template or data field rebuilds.
"""

from __future__ import annotations

import json

import pytest

import data_reference
import onecard.data.prepare as prepare
from onecard.data import build_dataset
from onecard.data.cache import read_stats
from onecard.errors import UserError
from onecard.recipe import Recipe
from onecard.tiny import build_tiny_tokenizer

WORDS = "the quick brown fox jumps over the lazy dog and a plan for one GPU needs numbers that hold".split()


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONECARD_DATA_CACHE", str(tmp_path / "cache"))


def text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n))


def chat_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "be brief"}] if i % 3 == 0 else []
        for turn in range(1 + i % 3):
            messages += [{"role": "user", "content": text(i + turn, 3 + i % 5)},
                         {"role": "assistant", "content": text(i * 2 + turn, 2 + (i * 5) % 17)}]
        if i % 11 == 4:
            messages = messages[:1] if messages[0]["role"] == "user" else messages[:2]  # no assistant turn: dropped
        rows.append({"messages": messages})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe(path, task="sft", **data):
    tree = {"model": {"name_or_path": "x"}, "task": task, "training": {"seed": 3}, "data": {"path": str(path), **data}}
    return Recipe.model_validate(tree)


def assert_same(new, old):
    assert len(new) == len(old)
    assert list(new.examples) == list(old.examples)  # input_ids, labels and position_ids, row by row
    assert new.stats == old.stats
    assert new.format == old.format


CASES = {
    "chat packed": (lambda: chat_rows(40), "sft", {"seq_len": 96, "packing": True}),
    "chat truncated": (lambda: chat_rows(40), "sft", {"seq_len": 40}),
    "alpaca": (lambda: [{"instruction": text(i, 4), "input": text(i, i % 3), "output": text(i, 1 + i % 9)}
                        for i in range(25)], "sft", {"seq_len": 64, "packing": True}),
    "text sft": (lambda: [{"text": text(i, 1 + i % 13)} for i in range(25)], "sft", {"seq_len": 16}),
    "pretrain": (lambda: [{"text": text(i, i % 13)} for i in range(25)], "pretrain", {"seq_len": 16}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("workers", [1, 2])
def test_cached_path_equals_in_memory_path(tmp_path, tok, monkeypatch, case, workers):
    rows, task, data = CASES[case]
    monkeypatch.setattr(prepare, "MIN_RECORDS_PER_WORKER", 1)  # let a small file use worker processes
    r = recipe(write_jsonl(tmp_path / "d.jsonl", rows()), task=task, **data)
    assert_same(build_dataset(r, tok, num_proc=workers), data_reference.build_dataset(r, tok))


@pytest.mark.parametrize("case", sorted(CASES))
def test_row_lengths_from_the_store_are_the_rows_lengths(tmp_path, tok, case):
    from onecard.data.store import row_lengths

    rows, task, data = CASES[case]
    built = build_dataset(recipe(write_jsonl(tmp_path / "d.jsonl", rows()), task=task, **data), tok)
    assert row_lengths(built.examples) == [len(row["input_ids"]) for row in built.examples]
    assert row_lengths(list(built.examples)) == row_lengths(built.examples)  # an in-memory list counts the same


def test_eval_fraction_splits_equal_in_memory_path(tmp_path, tok):
    r = recipe(write_jsonl(tmp_path / "d.jsonl", chat_rows(30)), seq_len=128, packing=True, eval_fraction=0.2)
    for split in ("train", "eval"):
        assert_same(build_dataset(r, tok, split), data_reference.build_dataset(r, tok, split))


def test_slices_and_negative_indices_read_like_a_list(tmp_path, tok):
    r = recipe(write_jsonl(tmp_path / "d.jsonl", chat_rows(20)), seq_len=64, packing=True)
    new, old = build_dataset(r, tok), data_reference.build_dataset(r, tok)
    assert new.examples[1:4] == old.examples[1:4] and new.examples[-1] == old.examples[-1]
    with pytest.raises(IndexError):
        new.examples[len(old)]


def test_second_build_reads_the_cache_without_tokenising(tmp_path, tok, monkeypatch):
    r = recipe(write_jsonl(tmp_path / "d.jsonl", chat_rows(20)), seq_len=64, packing=True)
    first = build_dataset(r, tok)
    assert not first.from_cache

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(prepare, "tokenise_batch", no_tokenising)
    second = build_dataset(r, tok)
    assert second.from_cache and second.entry == first.entry
    assert list(second.examples) == list(first.examples)


@pytest.mark.parametrize("change", ["file", "template", "seq_len"])
def test_a_changed_input_rebuilds(tmp_path, tok, change):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(20))
    first = build_dataset(recipe(path, seq_len=64), tok)
    data = {"seq_len": 64}
    if change == "file":  # same size, same records count: only the content hash can tell
        path.write_text(path.read_text().replace("quick", "QUICK"), encoding="utf-8")
    elif change == "template":
        data["chat_template"] = "alpaca"
    else:
        data["seq_len"] = 48
    r = recipe(path, **data)
    second = build_dataset(r, tok)
    assert not second.from_cache and second.entry != first.entry
    assert list(second.examples) == list(data_reference.build_dataset(r, tok).examples)


def test_a_bad_line_is_reported_before_any_tokenising(tmp_path, tok, monkeypatch):
    rows = chat_rows(30)
    rows[27]["messages"][0]["role"] = "human"
    path = write_jsonl(tmp_path / "d.jsonl", rows)

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenising started before validation finished")

    monkeypatch.setattr(prepare, "tokenise_batch", no_tokenising)
    with pytest.raises(UserError) as err:
        build_dataset(recipe(path), tok)
    assert err.value.where == f"{path}:28" and "unknown role 'human'" in err.value.what


def test_first_template_refusal_in_file_order_from_workers(tmp_path, tok, monkeypatch):
    """A template that refuses some records: the first refused line is reported, whichever worker met it."""
    monkeypatch.setattr(prepare, "MIN_RECORDS_PER_WORKER", 1)
    rows = chat_rows(24)
    for i in (9, 20):
        rows[i] = {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"},
                                {"role": "assistant", "content": "z"}]}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    template = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
                "{{ raise_exception('roles must alternate') }}{% endif %}"
                "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    monkeypatch.setattr(tok, "chat_template", template)
    with pytest.raises(UserError) as err:
        build_dataset(recipe(path), tok, num_proc=2)
    assert err.value.where == f"{path}:10" and "alternate" in err.value.what


def test_statistics_agree_with_the_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(40))
    ds = build_dataset(recipe(path, seq_len=64, packing=True), tok)
    s = ds.summary
    rows = list(ds.examples)
    tokens = sum(len(r["input_ids"]) for r in rows)
    assert s["tokens"] == tokens == ds.stats.tokens
    assert s["trained_fraction"] == pytest.approx(ds.stats.trained_tokens / tokens)
    assert s["packing"]["rows"] == len(rows) and s["packing"]["efficiency"] == pytest.approx(tokens / (len(rows) * 64))
    assert sum(s["histogram"]["counts"]) == s["records"] == 40
    assert s["truncated"] == ds.stats.truncated > 0 and s["dropped"] == ds.stats.dropped > 0
    assert s["examples"] == sum(r["position_ids"].count(0) for r in rows)  # each packed example restarts at 0
    assert read_stats(path) == s  # what the planner reads, without a tokenizer
    path.write_text(path.read_text() + "\n", encoding="utf-8")
    assert read_stats(path) is None  # stale once the file changes


def test_five_steps_give_exactly_the_losses_of_the_in_memory_path(tmp_path, tiny_llama_dir, monkeypatch):
    import onecard.data
    from onecard.train.loop import train

    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(40))

    def run(name):
        tree = {"name": name, "model": {"name_or_path": tiny_llama_dir}, "adapter": {"rank": 4, "dropout": 0.1},
                "data": {"path": str(path), "seq_len": 96, "packing": True},
                "training": {"max_steps": 5, "micro_batch_size": 2, "grad_accum": 2, "learning_rate": 1e-2,
                             "warmup_steps": 1, "optimizer": "adamw_torch", "seed": 5, "grad_ckpt": False},
                "output_dir": str(tmp_path / "runs" / "{name}")}
        train(Recipe.model_validate(tree))
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if '"loss"' in line]

    cached = run("cached")
    with monkeypatch.context() as m:
        m.setattr(onecard.data, "build_dataset", data_reference.build_dataset)
        reference = run("reference")
    assert len(cached) == 5 and cached == reference


def test_rebuild_replaces_the_entry(tmp_path, tok):
    r = recipe(write_jsonl(tmp_path / "d.jsonl", chat_rows(12)), seq_len=64)
    first = build_dataset(r, tok)
    stamp = (first.entry / "meta.json").stat().st_mtime_ns
    again = build_dataset(r, tok, rebuild=True)
    assert not again.from_cache and again.entry == first.entry
    assert (again.entry / "meta.json").stat().st_mtime_ns != stamp
    assert list(again.examples) == list(first.examples)


def test_a_launch_does_not_validate_data_the_cache_prepared_from_the_same_content(tmp_path, tok, monkeypatch):
    import onecard.lint.data as lint_data
    from onecard.lint import lint_recipe

    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(30))
    r = recipe(path, seq_len=64, packing=True)
    scans = []
    real_scan = lint_data.scan_file
    monkeypatch.setattr(lint_data, "scan_file", lambda *a, **k: scans.append(a[1]) or real_scan(*a, **k))
    lint_recipe(r, tokenizer=tok, model_config={}, device="cpu")
    assert scans == [str(path)]  # not prepared yet: every record read
    build_dataset(r, tok)
    lint_recipe(r, tokenizer=tok, model_config={}, device="cpu")
    assert scans == [str(path)]  # prepared from this content: validated then, not read again
    write_jsonl(path, chat_rows(30)[:-1] + [{"messages": "not a list"}])  # changed content: read, and its error found
    findings = lint_recipe(r, tokenizer=tok, model_config={}, device="cpu")
    assert len(scans) == 2 and any(f.id == "data-format" and f.where.endswith(":30") for f in findings)
