"""build_dataset end to end: formats, truncation/drop stats, packing, pre-training blocks, splits, batching."""

from __future__ import annotations

import csv
import json

import pytest

from onecard.data import IGNORE_INDEX, build_dataset, collate, epoch_order, read_records
from onecard.errors import UserError
from onecard.recipe import Recipe
from onecard.tiny import build_tiny_tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning a language model on one GPU needs a plan.",
    "I am fine, thank you.",
    "yes",
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def recipe(path, task="sft", seed=42, **data):
    tree = {"model": {"name_or_path": "x"}, "task": task, "training": {"seed": seed}, "data": {"path": str(path), **data}}
    return Recipe.model_validate(tree)


def chat(user, assistant=None):
    messages = [{"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return {"messages": messages}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def n_tokens(tok, text):
    return len(tok.encode(text, add_special_tokens=False))


def test_truncation_and_drop_statistics(tmp_path, tok):
    seq_len = 40
    long_answer = "The quick brown fox jumps over the lazy dog. " * 6
    rows = [
        chat("hello", "yes"),  # fits
        chat("hello", long_answer),  # truncated, keeps some trained tokens
        chat(SENTENCES[0] * 4, "yes"),  # prompt alone exceeds seq_len: truncated and dropped
        chat("hello"),  # no assistant turn: dropped, not truncated
    ]
    ds = build_dataset(recipe(write_jsonl(tmp_path / "d.jsonl", rows), seq_len=seq_len), tok)

    prompt = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    short_len = n_tokens(tok, prompt + "yes<|im_end|>\n")
    assert ds.stats.as_dict() == {
        "records": 4,
        "truncated": 2,
        "dropped": 2,
        "tokens": short_len + seq_len,
        "trained_tokens": n_tokens(tok, "yes<|im_end|>") + (seq_len - n_tokens(tok, prompt)),
        "truncated_at": [f"{tmp_path / 'd.jsonl'}:2", f"{tmp_path / 'd.jsonl'}:3"],
        "dropped_at": [f"{tmp_path / 'd.jsonl'}:3", f"{tmp_path / 'd.jsonl'}:4"],
    }
    assert [len(ex["input_ids"]) for ex in ds.examples] == [short_len, seq_len]
    assert all(len(ex["labels"]) == len(ex["input_ids"]) for ex in ds.examples)


def test_alpaca_and_text_formats(tmp_path, tok):
    rows = [{"instruction": "Summarise the text.", "input": "a long document", "output": "a short summary"}]
    ds = build_dataset(recipe(write_jsonl(tmp_path / "a.jsonl", rows)), tok)
    assert ds.format == "alpaca"
    text = tok.decode(ds.examples[0]["input_ids"])
    assert "user\nSummarise the text.\n\na long document<|im_end|>" in text
    trained = [t for t in ds.examples[0]["labels"] if t != IGNORE_INDEX]
    assert tok.decode(trained) == "a short summary<|im_end|>"

    ds = build_dataset(recipe(write_jsonl(tmp_path / "t.jsonl", [{"text": SENTENCES[2]}])), tok)
    ex = ds.examples[0]
    assert ds.format == "text" and ex["input_ids"][-1] == tok.eos_token_id
    assert ex["labels"][0] == IGNORE_INDEX and ex["labels"][1:] == ex["input_ids"][1:]


def test_sft_packing_resets_position_ids(tmp_path, tok):
    rows = [chat(s, SENTENCES[(i + 1) % 4]) for i, s in enumerate(SENTENCES * 3)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    plain = build_dataset(recipe(path, seq_len=128), tok)
    packed = build_dataset(recipe(path, seq_len=128, packing=True), tok)

    lengths = [len(ex["input_ids"]) for ex in plain.examples]
    assert len(packed) < len(plain)
    assert all(len(row["input_ids"]) <= 128 for row in packed.examples)
    assert plain.stats.truncated == 0
    # position_ids restart at each example: rebuilding them from the unpacked lengths must match exactly
    flat_positions = [p for row in packed.examples for p in row["position_ids"]]
    assert flat_positions == [p for n in lengths for p in range(n)]
    assert [t for row in packed.examples for t in row["input_ids"]] == [t for ex in plain.examples for t in ex["input_ids"]]
    for row in packed.examples:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert starts[0] == 0 and all(row["labels"][i] == IGNORE_INDEX for i in starts)
    assert packed.stats.trained_tokens == plain.stats.trained_tokens
    assert packed.stats.tokens == plain.stats.tokens


def test_pretrain_blocks(tmp_path, tok):
    rows = [{"text": s} for s in SENTENCES * 2]
    ds = build_dataset(recipe(write_jsonl(tmp_path / "p.jsonl", rows), task="pretrain", seq_len=16), tok)
    stream = []
    for s in SENTENCES * 2:
        stream += tok.encode(s, add_special_tokens=False) + [tok.eos_token_id]
    blocks = [ex["input_ids"] for ex in ds.examples]
    assert all(len(b) == 16 for b in blocks[:-1]) and 2 <= len(blocks[-1]) <= 16
    assert [t for b in blocks for t in b] == stream[: len(stream) - (len(stream) % 16 == 1)]
    assert all(ex["labels"] == ex["input_ids"] for ex in ds.examples)
    assert ds.stats.records == 8 and ds.stats.tokens == sum(map(len, blocks))
    assert ds.stats.trained_tokens == sum(len(b) - 1 for b in blocks)


def test_pretrain_rejects_chat_records(tmp_path, tok):
    with pytest.raises(UserError, match="pretrain"):
        build_dataset(recipe(write_jsonl(tmp_path / "c.jsonl", [chat("a", "b")]), task="pretrain"), tok)


def test_eval_fraction_split_is_deterministic_and_disjoint(tmp_path, tok):
    rows = [chat(f"{i}", "yes") for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)

    def split_users(seed, split):
        ds = build_dataset(recipe(path, seed=seed, eval_fraction=0.25), tok, split=split)
        return sorted(tok.decode(ex["input_ids"]).split("user\n")[1].split("<")[0] for ex in ds.examples)

    train, held = split_users(1, "train"), split_users(1, "eval")
    assert len(held) == 5 and len(train) == 15 and not set(train) & set(held)
    assert split_users(1, "eval") == held
    assert split_users(2, "eval") != held
    assert len(build_dataset(recipe(path), tok, split="eval")) == 0


def test_eval_path(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [chat("a", "b")] * 3)
    held = write_jsonl(tmp_path / "eval.jsonl", [chat("hello", "yes")] * 2)
    r = recipe(train, eval_path=str(held), eval_fraction=0.5, packing=True)
    assert len(build_dataset(r, tok, "train").examples[0]["input_ids"]) > 30  # packed
    ev = build_dataset(r, tok, "eval")
    assert len(ev) == 2 and "position_ids" not in ev.examples[0]  # eval is never packed


def test_parquet_and_csv(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    rows = [chat("hello", "yes"), chat("no?", "true")]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    ds = build_dataset(recipe(tmp_path / "d.parquet"), tok)
    assert len(ds) == 2 and ds.format == "chat"

    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "output"])
        writer.writerow(["Summarise the text.", "a short summary"])
        writer.writerow(["yes", "x"])
        writer.writerow(["hello", None])
    records = read_records(tmp_path / "d.csv")
    assert [r.line for r in records] == [2, 3, 4]
    with pytest.raises(UserError) as err:
        build_dataset(recipe(tmp_path / "d.csv"), tok)
    assert err.value.where == f"{tmp_path / 'd.csv'}:4" and "output" in err.value.what


def test_collate_pads_right(tok):
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [-100]},
    ]
    batch = collate(examples, pad_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert "position_ids" not in batch
    packed = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "position_ids": [0, 0, 1]}, {"input_ids": [4], "labels": [4], "position_ids": [0]}]
    assert collate(packed, 0)["position_ids"].tolist() == [[0, 0, 1], [0, 1, 2]]


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    import torch

    torch.manual_seed(0)
    before = torch.get_rng_state()
    order = epoch_order(50, seed=7, epoch=3)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert epoch_order(50, 7, 3) == order
    assert epoch_order(50, 7, 4) != order and epoch_order(50, 8, 3) != order
    assert epoch_order(5, 7, 3, shuffle=False) == [0, 1, 2, 3, 4]


def test_read_records_keeps_lines_across_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [(r.data["text"], r.line) for r in read_records(path)] == [("a", 1), ("b", 3)]


def test_packing_matches_padding_on_a_tiny_model(tmp_path, tok):
    """Invariant: the logits of a packed row equal each example run alone (no cross-contamination)."""
    import torch
    import transformers

    from onecard.data import model_inputs
    from onecard.tiny import tiny_config

    rows = [chat(s, SENTENCES[(i + 1) % 4]) for i, s in enumerate(SENTENCES)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    plain = build_dataset(recipe(path, seq_len=256), tok)
    packed = build_dataset(recipe(path, seq_len=256, packing=True), tok)
    assert len(packed) == 1
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", len(tok)), dtype=torch.float32).eval()
    with torch.no_grad():
        batch = collate(packed.examples + [plain.examples[0]], pad_id=tok.pad_token_id)  # mixed with a shorter row
        packed_logits = model(**model_inputs(collate(packed.examples, tok.pad_token_id))).logits[0]
        start = 0
        for ex in plain.examples:
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            n = len(ex["input_ids"])
            torch.testing.assert_close(packed_logits[start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
        # control: passing the 2-D attention mask as well lets packed examples see each other
        leaky = model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1]).logits[0]
        n0 = len(plain.examples[0]["input_ids"])
        assert not torch.allclose(leaky[n0 : n0 + 5], model(input_ids=torch.tensor([plain.examples[1]["input_ids"]])).logits[0][:5], atol=1e-3)
