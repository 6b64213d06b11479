"""ShareGPT, OpenAI tool turns and data.columns / data.roles: read into the same messages as the chat format,
the detection said on stderr, and each bad record named by file:line."""

from __future__ import annotations

import json

import pytest

from onecard.data import build_dataset
from onecard.errors import UserError
from onecard.recipe import Recipe
from onecard.tiny import build_tiny_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome"}]
SHAREGPT = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                               "value": m["content"]} for m in CHAT]}
TOOLS = {"messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "Sunny and 21 C."}]}
SHAREGPT_TOOLS = {"conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"from": "observation", "value": "sunny, 21 C"},
    {"from": "gpt", "value": "Sunny and 21 C."}]}


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def recipe(path, **data):
    return Recipe.model_validate({"model": {"name_or_path": "x"}, "data": {"path": str(path), "seq_len": 256, **data}})


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def built(tmp_path, tok, name, rows, **data):
    dataset = build_dataset(recipe(write(tmp_path / name, rows), **data), tok)
    return dataset, [(list(dataset[i]["input_ids"]), list(dataset[i]["labels"])) for i in range(len(dataset))]


def trained_text(tok, labels) -> str:
    return tok.decode([t for t in labels if t != -100])


def test_sharegpt_trains_exactly_what_the_chat_record_trains(tmp_path, tok, capsys):
    _, chat = built(tmp_path, tok, "chat.jsonl", [{"messages": CHAT}] * 3)
    dataset, sharegpt = built(tmp_path, tok, "sharegpt.jsonl", [SHAREGPT] * 3)
    assert sharegpt == chat and dataset.format == "sharegpt"
    assert "data: detected ShareGPT (conversations/from/value) in sharegpt.jsonl" in capsys.readouterr().err
    assert trained_text(tok, chat[0][1]) == "Paris<|im_end|>Rome<|im_end|>"


def test_sharegpt_function_call_and_observation_become_tool_turns(tmp_path, tok):
    _, openai = built(tmp_path, tok, "tools.jsonl", [TOOLS] * 2, chat_template="qwen2.5")
    _, sharegpt = built(tmp_path, tok, "sg-tools.jsonl", [SHAREGPT_TOOLS] * 2, chat_template="qwen2.5")
    assert sharegpt == openai
    ids, labels = openai[0]
    text, trained = tok.decode(ids), trained_text(tok, labels)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    # the call and the final answer are trained, each with its end of turn; the tool's answer is not
    assert trained == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' \
                      "Sunny and 21 C.<|im_end|>"


def test_tool_turns_under_a_template_that_drops_them_are_refused(tmp_path, tok):
    path = write(tmp_path / "tools.jsonl", [{"messages": CHAT}, TOOLS])
    with pytest.raises(UserError) as err:
        build_dataset(recipe(path), tok)  # the tiny tokenizer's ChatML template drops tool_calls
    assert err.value.where == f"{path}:2" and "does not render them" in err.value.what and "qwen2.5" in err.value.fix


def test_columns_and_roles_map_other_names(tmp_path, tok, capsys):
    _, chat = built(tmp_path, tok, "chat.jsonl", [{"messages": CHAT}] * 2)
    renamed = {"dialog": [{"speaker": {"assistant": "bot", "user": "customer"}.get(m["role"], m["role"]),
                           "text": m["content"]} for m in CHAT]}
    _, mapped = built(tmp_path, tok, "dialog.jsonl", [renamed] * 2, columns={"messages": "dialog", "role": "speaker",
                      "content": "text"}, roles={"bot": "assistant", "customer": "user"})
    assert mapped == chat
    assert "with messages <- dialog" in capsys.readouterr().err
    alpaca = [{"question": "Capital of France?", "answer": "Paris"}] * 2
    _, rows = built(tmp_path, tok, "qa.jsonl", alpaca, columns={"instruction": "question", "output": "answer"})
    assert trained_text(tok, rows[0][1]) == "Paris<|im_end|>"


@pytest.mark.parametrize("bad, needle", [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]}, "unknown speaker 'robot'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}, "missing field 'value'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{oops"}]}, "not JSON"),
    ({"conversations": SHAREGPT["conversations"], "tools": "[{\"name\": \"f\"}]"}, "tool definitions"),
])
def test_bad_sharegpt_records_name_their_line(tmp_path, tok, bad, needle):
    path = write(tmp_path / "sg.jsonl", [SHAREGPT, SHAREGPT, bad])
    with pytest.raises(UserError) as err:
        build_dataset(recipe(path), tok)
    assert err.value.where == f"{path}:3" and needle in err.value.what and err.value.fix


@pytest.mark.parametrize("call, needle", [
    ({"type": "function", "function": {"arguments": "{}"}}, "with a 'name'"),
    ({"type": "function", "function": {"name": "f", "arguments": "{city: Paris}"}}, "arguments are not JSON"),
    ({"type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}, "must be an object"),
])
def test_bad_tool_calls_name_their_line(tmp_path, tok, call, needle):
    bad = {"messages": [TOOLS["messages"][0], {"role": "assistant", "content": None, "tool_calls": [call]}]}
    path = write(tmp_path / "t.jsonl", [TOOLS, bad])
    with pytest.raises(UserError) as err:
        build_dataset(recipe(path, chat_template="qwen2.5"), tok)
    assert err.value.where == f"{path}:2" and needle in err.value.what


def test_a_mapped_column_missing_from_a_record(tmp_path, tok):
    path = write(tmp_path / "qa.jsonl", [{"question": "a", "answer": "b"}, {"question": "a", "reply": "b"}])
    with pytest.raises(UserError) as err:
        build_dataset(recipe(path, columns={"instruction": "question", "output": "answer"}), tok)
    assert err.value.where == f"{path}:2" and "missing field 'answer' (data.columns.output reads it)" in err.value.what
