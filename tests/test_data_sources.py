"""Sources read through ``datasets``: a save_to_disk directory, a Parquet/Arrow directory, a hub id from a local
datasets cache (HF_HUB_OFFLINE=1, nothing downloaded). Each trains the same records as the JSONL file they came
from, names its rows in errors, and a changed source is prepared again."""

from __future__ import annotations

import json
import shutil

import pytest

from onecard.data import build_dataset, select_records
from onecard.errors import UserError
from onecard.recipe import Recipe
from onecard.tiny import build_tiny_tokenizer

ROWS = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer " * (1 + i % 3)}]}
        for i in range(6)]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def recipe(path, **data):
    return Recipe.model_validate({"model": {"name_or_path": "x"}, "data": {"path": str(path), "seq_len": 64, **data}})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ids_of(dataset) -> list[list[int]]:
    return [list(dataset[i]["input_ids"]) for i in range(len(dataset))]


def save_to_disk(path, rows, split=None):
    import datasets

    table = datasets.Dataset.from_list(rows)
    (datasets.DatasetDict({split: table}) if split else table).save_to_disk(str(path))
    return path


def fill_hub_cache(cache_dir, repo_id, rows, split="train"):
    """The directory ``datasets.load_dataset(repo_id)`` leaves in HF_DATASETS_CACHE, built from local Parquet with
    datasets' own Parquet builder: <cache>/<owner>___<name>/default/0.0.0/<hash>/ (what datasets reads offline)."""
    import datasets
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    work = cache_dir.parent / f"build-{repo_id.replace('/', '-')}"
    (work / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(work / "data" / f"{split}.parquet"))
    builder = Parquet(cache_dir=str(work / "cache"), dataset_name=repo_id.split("/")[-1],
                      data_files=DataFilesDict.from_patterns({split: [str(work / "data" / f"{split}.parquet")]}))
    builder.download_and_prepare()
    target = cache_dir / repo_id.replace("/", "___") / "default" / "0.0.0" / "0123abcd"
    shutil.copytree(builder.cache_dir, target)
    info = json.loads((target / "dataset_info.json").read_text())
    info["config_name"] = "default"
    (target / "dataset_info.json").write_text(json.dumps(info))
    return target


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    import datasets

    cache = tmp_path / "hf-datasets"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_save_to_disk_dir_trains_the_same_tokens_as_the_jsonl(tmp_path, tok):
    expected = ids_of(build_dataset(recipe(write_jsonl(tmp_path / "d.jsonl", ROWS)), tok))
    saved = save_to_disk(tmp_path / "saved", ROWS)
    assert ids_of(build_dataset(recipe(saved), tok)) == expected
    dict_dir = save_to_disk(tmp_path / "saved-dict", ROWS, split="validation")
    assert ids_of(build_dataset(recipe(dict_dir, split="validation"), tok)) == expected
    with pytest.raises(UserError) as err:
        build_dataset(recipe(dict_dir), tok)  # data.split defaults to train
    assert err.value.where == "data.split" and "validation" in err.value.what


def test_parquet_and_arrow_dirs(tmp_path, tok):
    import datasets

    expected = ids_of(build_dataset(recipe(write_jsonl(tmp_path / "d.jsonl", ROWS)), tok))
    parquet = tmp_path / "pq"
    parquet.mkdir()
    datasets.Dataset.from_list(ROWS[:3]).to_parquet(str(parquet / "part-0.parquet"))
    datasets.Dataset.from_list(ROWS[3:]).to_parquet(str(parquet / "part-1.parquet"))
    assert ids_of(build_dataset(recipe(parquet), tok)) == expected
    saved = save_to_disk(tmp_path / "saved", ROWS)
    arrow = tmp_path / "arrow"
    arrow.mkdir()
    for file in saved.glob("*.arrow"):  # the Arrow files without save_to_disk's state.json
        shutil.copy(file, arrow / file.name)
    assert ids_of(build_dataset(recipe(arrow), tok)) == expected


def test_hub_id_from_the_datasets_cache(tmp_path, tok, hub_cache):
    expected = ids_of(build_dataset(recipe(write_jsonl(tmp_path / "d.jsonl", ROWS)), tok))
    fill_hub_cache(hub_cache, "someone/chats", ROWS)
    dataset = build_dataset(recipe("hub:someone/chats", revision="main"), tok)
    assert ids_of(dataset) == expected and not dataset.from_cache
    assert build_dataset(recipe("hub:someone/chats", revision="main"), tok).from_cache
    records = select_records(recipe("hub:someone/chats"), "train")
    assert records[4].where == "hub:someone/chats[train] (row 5)"


def test_uncached_hub_id_offline_is_one_user_error(tok, hub_cache):
    with pytest.raises(UserError) as err:
        build_dataset(recipe("hub:nobody/absent"), tok)
    assert err.value.where == "data.path"
    assert "not in the datasets cache" in err.value.what and "HF_HUB_OFFLINE=1" in err.value.what


def test_bad_row_in_a_dataset_names_the_source_and_row(tmp_path, tok, hub_cache):
    bad = ROWS[:3] + [{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}] + ROWS[3:]
    with pytest.raises(UserError) as err:
        build_dataset(recipe(save_to_disk(tmp_path / "saved", bad)), tok)
    assert err.value.where == f"{tmp_path / 'saved'}/ (row 4)" and "unknown role 'robot'" in err.value.what
    fill_hub_cache(hub_cache, "someone/bad", bad)
    with pytest.raises(UserError) as err:
        build_dataset(recipe("hub:someone/bad"), tok)
    assert err.value.where == "hub:someone/bad[train] (row 4)"


def test_a_changed_directory_is_prepared_again(tmp_path, tok):
    saved = save_to_disk(tmp_path / "saved", ROWS)
    first = build_dataset(recipe(saved), tok)
    assert build_dataset(recipe(saved), tok).from_cache
    shutil.rmtree(saved)
    save_to_disk(saved, ROWS[:4])
    second = build_dataset(recipe(saved), tok)
    assert not second.from_cache and len(second) == 4 and second.entry != first.entry


def test_a_directory_without_a_dataset(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        build_dataset(recipe(tmp_path / "empty"), tok)
    assert "no dataset in it" in err.value.what and "save_to_disk" in err.value.fix
