"""Acceptance (data in): each format and source trained through ``onecard train`` on a tiny model, and a bad input
of each stopped with its file:line (or row), exit 2 and no traceback. The hub id comes from a local datasets cache
with HF_HUB_OFFLINE=1: nothing is downloaded."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from _run_helpers import run_cli, summary
from test_data_sharegpt import SHAREGPT, SHAREGPT_TOOLS, TOOLS
from test_data_sources import fill_hub_cache, save_to_disk

os.environ.setdefault("OMP_NUM_THREADS", "1")

CHAT = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": "yes " * (1 + i % 3)}]}
        for i in range(6)]
BAD_ROLE = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
BAD_SPEAKER = {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def parquet_dir(path, rows):
    import datasets

    path.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(path / "train-0.parquet"))
    return path


def sharegpt(tmp, rows):
    return jsonl(tmp / "sg.jsonl", rows), {}


def openai_tools(tmp, rows):
    return jsonl(tmp / "tools.jsonl", rows), {"chat_template": "qwen2.5"}


def mapped(tmp, rows):
    renamed = [{"dialog": [{"speaker": {"assistant": "bot"}.get(m["role"], m["role"]), "text": m["content"]}
                           for m in r["messages"]]} for r in rows]
    return jsonl(tmp / "dialog.jsonl", renamed), {"columns": {"messages": "dialog", "role": "speaker", "content": "text"},
                                                   "roles": {"bot": "assistant"}}


def saved(tmp, rows):
    return save_to_disk(tmp / "saved", rows), {}


def parquet(tmp, rows):
    return parquet_dir(tmp / "pq", rows), {}


def hub(tmp, rows):
    import datasets

    fill_hub_cache(datasets.config.HF_DATASETS_CACHE, f"someone/{tmp.name}", rows)  # someone/good, someone/bad
    return f"hub:someone/{tmp.name}", {"revision": "main"}


# (name, writer, good rows, bad rows, where the bad row is named, what the message says)
CASES = [
    ("sharegpt", sharegpt, [SHAREGPT] * 4, [SHAREGPT] * 2 + [BAD_SPEAKER], "sg.jsonl:3", "unknown speaker 'robot'"),
    ("openai-tools", openai_tools, [TOOLS] * 4, [TOOLS, {"messages": [TOOLS["messages"][0], {
        "role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
            "name": "f", "arguments": "{bad"}}]}]}], "tools.jsonl:2", "arguments are not JSON"),
    ("columns-roles", mapped, CHAT, CHAT[:3] + [BAD_ROLE], "dialog.jsonl:4", "unknown role 'robot'"),
    ("save-to-disk", saved, CHAT, CHAT[:2] + [BAD_ROLE] + CHAT[2:], "saved/ (row 3)", "unknown role 'robot'"),
    ("parquet-dir", parquet, CHAT, CHAT[:4] + [BAD_ROLE], "pq/ (row 5)", "unknown role 'robot'"),
    ("hub", hub, CHAT, [BAD_ROLE] + CHAT, "hub:someone/bad[train] (row 1)", "unknown role 'robot'"),
]


NOTICES = {
    "sharegpt": "data: detected ShareGPT (conversations/from/value) in sg.jsonl",
    "openai-tools": "data: detected OpenAI chat (messages/role/content) in tools.jsonl",
    "columns-roles": "data: detected OpenAI chat (messages/role/content) in dialog.jsonl, with content <- text, "
                     "messages <- dialog, role <- speaker, bot -> assistant",  # yaml.safe_dump sorts the keys
    "save-to-disk": "data: detected OpenAI chat (messages/role/content) in ",
    "parquet-dir": "data: detected OpenAI chat (messages/role/content) in ",
    "hub": "data: detected OpenAI chat (messages/role/content) in hub:someone/good[train]",
}


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def write_recipe(tmp_path, model_dir, data_path, **data):
    tree = {"name": "data-in", "model": {"name_or_path": str(model_dir)}, "adapter": {"rank": 4},
            "data": {"path": str(data_path), "seq_len": 128, **data},
            "training": {"max_steps": 2, "micro_batch_size": 2, "optimizer": "adamw_torch", "grad_ckpt": False},
            "output_dir": str(tmp_path / "runs" / "{name}")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


@pytest.mark.parametrize("name, writer, good, bad, where, what", CASES, ids=[c[0] for c in CASES])
def test_trains_and_refuses_bad_input(tmp_path, tiny_llama_dir, capsys, offline_hub, name, writer, good, bad, where, what):
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    good_dir.mkdir(), bad_dir.mkdir()
    data_path, data = writer(good_dir, good)
    code, out, err = run_cli(["train", write_recipe(good_dir, tiny_llama_dir, data_path, **data)], capsys)
    assert code == 0, out + err
    assert NOTICES[name] in err  # what data.format: auto found, said in one line
    run = summary(good_dir / "runs" / "data-in")
    assert run["steps"] == 2 and run["final_loss"] > 0
    data_path, data = writer(bad_dir, bad)
    code, out, err = run_cli(["train", write_recipe(bad_dir, tiny_llama_dir, data_path, **data)], capsys)
    assert code == 2, out + err
    assert "Traceback" not in out + err, out + err
    assert where in out + err and what in out + err, out + err
