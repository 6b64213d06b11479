"""Preference data: tokenization like SFT, truncation, and bad input (UserError naming file, line, field and a fix;
through the CLI: exit 2, no traceback, no run directory). Also holds the synthetic-data writers the other
test_preference_* files import."""

from __future__ import annotations

import json
import os
import random

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")

WORDS = "the quick brown fox jumps over lazy dog fine model plan memory time".split()


def dpo_rows(n: int, seed: int) -> list[dict]:
    """Learnable by construction: chosen and rejected share a random prefix; chosen ends ' yes', rejected ' no'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"say {seed * 1000 + i} " + " ".join(rng.choice(WORDS) for _ in range(3))
        prefix = " ".join(rng.choice(WORDS) for _ in range(2))
        rows.append({"prompt": prompt, "chosen": f"{prefix} yes", "rejected": f"{prefix} no"})
    return rows


def kto_rows(n: int, seed: int) -> list[dict]:
    """Desirable completions end ' yes', undesirable ones ' no'; labels alternate."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"say {seed * 1000 + i} " + " ".join(rng.choice(WORDS) for _ in range(3))
        prefix = " ".join(rng.choice(WORDS) for _ in range(2))
        label = i % 2 == 0
        rows.append({"prompt": prompt, "completion": f"{prefix} {'yes' if label else 'no'}", "label": label})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def preference_tree(tmp_path, model_dir, task="dpo", name="pref", rows=None, **sections) -> dict:
    rows = rows if rows is not None else (dpo_rows(16, 1) if task == "dpo" else kto_rows(16, 1))
    tree = {"name": name, "model": {"name_or_path": str(model_dir)}, "task": task, "adapter": {"rank": 8},
            "data": {"path": write_jsonl(tmp_path / f"{task}.jsonl", rows), "seq_len": 64},
            "training": {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 2, "grad_ckpt": False,
                         "learning_rate": 1e-2, "warmup_steps": 0},
            "output_dir": str(tmp_path / "runs" / "{name}")}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return tree


def _dataset(tmp_path, model_dir, task, rows, **sections):
    from transformers import AutoTokenizer

    from onecard.data.preference import build_preference_dataset
    from onecard.recipe import validate_recipe

    recipe = validate_recipe(preference_tree(tmp_path, model_dir, task, rows=rows, **sections))
    return build_preference_dataset(recipe, AutoTokenizer.from_pretrained(model_dir)), AutoTokenizer.from_pretrained(
        model_dir)


# --------------------------------------------------------------------------- tokenization


def test_dpo_strings_and_messages_tokenize_like_sft(tmp_path, tiny_llama_dir):
    from onecard.data import resolve_template, tokenize_chat

    rows = [{"prompt": "hi", "chosen": "yes fox", "rejected": "no dog"},
            {"prompt": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": "yes fox"}], "rejected": {"role": "assistant", "content": "no"}}]
    ds, tok = _dataset(tmp_path, tiny_llama_dir, "dpo", rows)
    first = ds.examples[0]
    assert tok.decode(first["prompt_ids"]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(first["chosen_ids"]) == "yes fox<|im_end|>"  # reply + end-of-turn token, as SFT trains
    assert tok.decode(ds.examples[1]["rejected_ids"]) == "no<|im_end|>"
    assert tok.decode(ds.examples[1]["prompt_ids"]).startswith("<|im_start|>system\nbe terse")
    # SFT's masking on the same conversation trains the same text.
    ids, labels = tokenize_chat(tok, resolve_template(tok), [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "yes fox"}])
    assert tok.decode([t for t in labels if t != -100]) == tok.decode(first["chosen_ids"])
    assert ds.stats.records == 2 and ds.stats.dropped == 0


def test_prompt_truncated_from_left_then_completion_to_seq_len(tmp_path, tiny_llama_dir):
    long_prompt = "BEGIN " + "fox " * 60 + "END"
    rows = [{"prompt": long_prompt, "chosen": "yes " * 40, "rejected": "no"}]
    ds, tok = _dataset(tmp_path, tiny_llama_dir, "dpo", rows, preference={"max_prompt_len": 20})
    ex = ds.examples[0]
    assert len(ex["prompt_ids"]) == 20
    assert tok.decode(ex["prompt_ids"]).endswith("<|im_start|>assistant\n")  # the end of the prompt survives
    assert "BEGIN" not in tok.decode(ex["prompt_ids"])
    assert len(ex["prompt_ids"]) + len(ex["chosen_ids"]) == 64  # completion cut to seq_len
    assert tok.decode(ex["rejected_ids"]) == "no<|im_end|>"
    assert ds.stats.truncated == 1


def test_kto_labels_and_kl_pairs(tmp_path, tiny_llama_dir):
    from onecard.data.preference import collate_kto, kl_rows

    ds, _ = _dataset(tmp_path, tiny_llama_dir, "kto", kto_rows(3, 2))
    assert [ex["label"] for ex in ds.examples] == [True, False, True]
    pairs = kl_rows(ds.examples)
    for i, (ids, labels) in enumerate(pairs):  # prompt i with completion i-1
        prompt, other = ds.examples[i]["prompt_ids"], ds.examples[i - 1]["completion_ids"]
        assert ids == prompt + other and labels == [-100] * len(prompt) + other
    batch = collate_kto(ds.examples, 0)
    assert batch["label"].tolist() == [True, False, True]


# --------------------------------------------------------------------------- bad input

GOOD_DPO = {"prompt": "hi", "chosen": "yes", "rejected": "no"}
GOOD_KTO = {"prompt": "hi", "completion": "yes", "label": True}

BAD_CASES = {
    # id: (task, second line of the file (raw text), words the message must contain)
    "malformed-json": ("dpo", '{"prompt": "hi", "chosen": "yes", "rejected": }', ["malformed JSON"]),
    "missing-field": ("dpo", json.dumps({"prompt": "hi", "chosen": "yes"}), ["missing field 'rejected'"]),
    "chosen-wrong-type": ("dpo", json.dumps({**GOOD_DPO, "chosen": 3}), ["'chosen'", "int"]),
    "unknown-role": ("dpo", json.dumps({**GOOD_DPO, "prompt": [{"role": "human", "content": "hi"}]}),
                     ["unknown role 'human'", "'prompt'"]),
    "user-in-chosen": ("dpo", json.dumps({**GOOD_DPO, "chosen": [{"role": "user", "content": "x"}]}),
                       ["'chosen'", "assistant"]),
    "prompt-ends-assistant": ("dpo", json.dumps({**GOOD_DPO, "prompt": [{"role": "user", "content": "a"},
                                                                        {"role": "assistant", "content": "b"}]}),
                              ["prompt ends with an assistant"]),
    "content-not-string": ("dpo", json.dumps({**GOOD_DPO, "rejected": [{"role": "assistant", "content": None}]}),
                           ["'content'", "rejected[0]"]),
    "label-not-bool": ("kto", json.dumps({**GOOD_KTO, "label": "yes"}), ["'label'", "boolean"]),
    "label-missing": ("kto", json.dumps({"prompt": "hi", "completion": "yes"}), ["missing field 'label'"]),
}


def _write_bad(tmp_path, task, second_line) -> str:
    good = GOOD_DPO if task == "dpo" else GOOD_KTO
    path = tmp_path / f"{task}.jsonl"
    path.write_text(json.dumps(good) + "\n" + second_line + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_names_file_line_field_and_fix(tmp_path, tiny_llama_dir, case):
    from transformers import AutoTokenizer

    from onecard.data.preference import build_preference_dataset
    from onecard.errors import UserError
    from onecard.recipe import validate_recipe

    task, line, needles = BAD_CASES[case]
    tree = preference_tree(tmp_path, tiny_llama_dir, task)
    tree["data"]["path"] = _write_bad(tmp_path, task, line)
    with pytest.raises(UserError) as info:
        build_preference_dataset(validate_recipe(tree), AutoTokenizer.from_pretrained(tiny_llama_dir))
    err = info.value
    assert err.where.startswith(f"{tmp_path / task}.jsonl:2"), err.where
    assert err.fix, "every data error says how to fix it"
    for needle in needles:
        assert needle in err.render(), err.render()


def test_empty_file_non_utf8_and_all_too_long(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    from onecard.data.preference import build_preference_dataset
    from onecard.errors import UserError
    from onecard.recipe import validate_recipe

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tree = preference_tree(tmp_path, tiny_llama_dir, "dpo")
    path = tmp_path / "dpo.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        build_preference_dataset(validate_recipe(tree), tok)
    path.write_bytes(json.dumps(GOOD_DPO).encode() + b'\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(UserError, match="UTF-8") as info:
        build_preference_dataset(validate_recipe(tree), tok)
    assert info.value.where == f"{path}:2"
    write_jsonl(path, [{"prompt": "fox " * 80, "chosen": "yes", "rejected": "no"}] * 3)
    tree["data"]["seq_len"] = 32
    with pytest.raises(UserError, match="all 3 examples were too long") as info:
        build_preference_dataset(validate_recipe(tree), tok)
    assert "max_prompt_len" in info.value.fix and "seq_len" in info.value.fix


def test_sft_data_under_task_dpo_is_refused(tmp_path, tiny_llama_dir):
    from onecard.errors import UserError

    with pytest.raises(UserError, match="missing field 'prompt'"):
        _dataset(tmp_path, tiny_llama_dir, "dpo", [{"messages": [{"role": "user", "content": "hi"}]}])


def run_cli(argv, capsys):
    from onecard.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", ["malformed-json", "unknown-role", "label-not-bool"])
def test_cli_bad_data_exits_2_without_traceback_or_run_dir(tmp_path, tiny_llama_dir, capsys, case):
    task, line, needles = BAD_CASES[case]
    tree = preference_tree(tmp_path, tiny_llama_dir, task)
    tree["data"]["path"] = _write_bad(tmp_path, task, line)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree), encoding="utf-8")
    code, _, err = run_cli(["train", str(recipe)], capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert f"{task}.jsonl:2" in err and "fix" in err
    for needle in needles:
        assert needle in err
    assert not (tmp_path / "runs").exists()


def test_cli_recipe_refusals(tmp_path, tiny_llama_dir, capsys):
    """KTO with one example per step, and adapter-disabled with full fine-tuning: exit 2 before any work."""
    for extra, needle in ((dict(task="kto", training={"micro_batch_size": 1, "grad_accum": 1}), "training.grad_accum"),
                          (dict(method="full", preference={"reference": "adapter-disabled"}), "preference.reference")):
        tree = preference_tree(tmp_path, tiny_llama_dir, extra.pop("task", "dpo"), **extra)
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(tree), encoding="utf-8")
        code, _, err = run_cli(["train", str(recipe)], capsys)
        assert code == 2 and "Traceback" not in err and needle in err, err
        assert not (tmp_path / "runs").exists()
