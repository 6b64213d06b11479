"""The recipe schema: errors name file, line, field and fix; --set goes through the same validation."""

from __future__ import annotations

import pytest

from onecard.errors import UserError
from onecard.recipe import dump_recipe, load_recipe, validate_recipe


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_misspelt_field_names_line_and_suggests(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: x\ntraining:\n  epochs: 1\n  learnig_rate: 1e-4\n")
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert err.value.where == f"{path}:5"
    assert "training.learnig_rate" in err.value.what and "unknown field" in err.value.what
    assert "learning_rate" in err.value.fix


def test_invalid_choice_lists_allowed_values(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: x\nmethod: lorra\n")
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert err.value.where.endswith(":3")
    for allowed in ("lora", "qlora", "dora", "full"):
        assert allowed in err.value.fix


def test_negative_learning_rate_is_refused(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: x\ntraining:\n  learning_rate: -0.0001\n")
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert "training.learning_rate" in err.value.what and "greater than 0" in err.value.what
    assert err.value.fix


def test_set_overrides_are_parsed_and_validated(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: x\n")
    recipe = load_recipe(path, ["training.learning_rate=1e-4", "adapter.target_modules=[q_proj,v_proj]", "method=dora"])
    assert recipe.training.learning_rate == pytest.approx(1e-4)
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.method == "dora"
    with pytest.raises(UserError) as err:
        load_recipe(path, ["training.micro_batch_size=0"])
    assert "training.micro_batch_size" in err.value.what
    with pytest.raises(UserError):
        load_recipe(path, ["training.nonsense=1"])
    with pytest.raises(UserError):
        load_recipe(path, ["no_equals_sign"])


def test_missing_model_and_bad_yaml(tmp_path):
    with pytest.raises(UserError) as err:
        load_recipe(write(tmp_path, "method: lora\n"))
    assert "model" in err.value.what and "missing" in err.value.what
    with pytest.raises(UserError) as err:
        load_recipe(write(tmp_path, "model: [unclosed\n"))
    assert "YAML" in err.value.what
    with pytest.raises(UserError):
        load_recipe(tmp_path / "absent.yaml")


def test_dump_round_trips():
    recipe = validate_recipe({"model": {"name_or_path": "llama-3-8b"}, "method": "qlora"})
    import yaml

    again = validate_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe
    assert again.adapter.lora_alpha == 2 * again.adapter.rank
