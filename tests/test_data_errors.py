"""Bad data: each case is one UserError naming the file (and line), what is wrong, and a fix."""

from __future__ import annotations

import json

import pytest

from onecard.data import build_dataset, read_records
from onecard.errors import UserError
from onecard.recipe import Recipe
from onecard.tiny import build_tiny_tokenizer

GOOD = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}]}


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def recipe(path, **data):
    return Recipe.model_validate({"model": {"name_or_path": "x"}, "data": {"path": str(path), **data}})


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_error(path, tok, **data) -> UserError:
    with pytest.raises(UserError) as err:
        build_dataset(recipe(path, **data), tok)
    assert err.value.fix, "every data error carries a fix"
    return err.value


def test_malformed_json_line(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), json.dumps(GOOD), '{"messages": [{"role": "user",}]}'])
    err = build_error(path, tok)
    assert err.where == f"{path}:3"
    assert "malformed JSON" in err.what and "column" in err.what


def test_missing_field_in_message(tmp_path, tok):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), json.dumps(bad)])
    err = build_error(path, tok)
    assert err.where == f"{path}:2"
    assert "missing field 'content'" in err.what and "messages[1]" in err.what


def test_missing_field_in_alpaca_record(tmp_path, tok):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a", "response": "b"}]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    err = build_error(path, tok, format="alpaca")
    assert err.where == f"{path}:2" and "missing field 'output'" in err.what


def test_unknown_role(tmp_path, tok):
    bad = {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yes"}]}
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD)] * 4 + [json.dumps(bad)])
    err = build_error(path, tok)
    assert err.where == f"{path}:5"
    assert "unknown role 'human'" in err.what and "'user'" in err.fix


def test_empty_file(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text("")
    err = build_error(path, tok)
    assert err.where == str(path) and "empty" in err.what
    path.write_text("\n  \n")
    assert "empty" in build_error(path, tok).what


def test_non_utf8_bytes_name_the_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode() * 2 + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    err = build_error(path, tok)
    assert err.where == f"{path}:3" and "UTF-8" in err.what and "UTF-8" in err.fix


def test_unknown_extension(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    err = build_error(path, tok)
    assert err.where == str(path) and "'.txt'" in err.what and ".jsonl" in err.fix


def test_records_matching_no_format(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"question": "a", "answer": "b"})])
    err = build_error(path, tok)
    assert err.where == f"{path}:1"
    assert "unknown data format" in err.what and "answer, question" in err.what and '"messages"' in err.fix


def test_file_not_found(tmp_path, tok):
    err = build_error(tmp_path / "nope.jsonl", tok)
    assert "not found" in err.what and "nope.jsonl" in err.where and "data.path" in err.fix


def test_preference_data_with_sft_task_points_to_dpo(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})])
    err = build_error(path, tok)
    assert "preference" in err.what and "task: dpo" in err.fix


def test_everything_too_long_leaves_nothing_to_train(tmp_path, tok):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 10
    row = {"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "yes"}]}
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(row)] * 3)
    err = build_error(path, tok, seq_len=32)
    assert "nothing left to train on" in err.what and "3 were longer" in err.what
    assert "data.seq_len" in err.fix and "--set data.seq_len=128" in err.fix


def test_json_array_errors_name_the_line(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"}\n  {"text": "c"}\n]\n')
    err = build_error(path, tok)
    assert err.where == f"{path}:3" and "malformed JSON" in err.what
    path.write_text('[\n  {"text": "a"},\n  "just a string"\n]\n')
    with pytest.raises(UserError) as exc:
        read_records(path)
    assert exc.value.where == f"{path}:3" and "expected a JSON object" in exc.value.what


def test_error_message_renders_where_what_fix(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", ["{oops"])
    rendered = str(build_error(path, tok))
    head, fix = rendered.split("\n")
    assert head.startswith(f"{path}:1: malformed JSON") and fix.strip().startswith("fix: ")


def test_non_utf8_csv_names_the_line(tmp_path, tok):
    pytest.importorskip("datasets")
    path = tmp_path / "d.csv"
    path.write_bytes(b"instruction,output\nhello,yes\ncaf\xe9,x\n")
    err = build_error(path, tok)
    assert err.where == f"{path}:3" and "UTF-8" in err.what


def test_template_refusing_a_record_names_its_line(tmp_path, tok):
    gemma_like = build_tiny_tokenizer(
        chat_template="{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    )
    bad = {"messages": [{"role": "system", "content": "be brief"}] + GOOD["messages"]}
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), json.dumps(bad)])
    err = build_error(path, gemma_like)
    assert err.where == f"{path}:2" and "System role not supported" in err.what and "system" in err.fix
