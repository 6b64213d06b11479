"""``logging:`` sinks: a CPU ``onecard train`` run read back from a W&B offline run directory and an MLflow file
store holds the same series as its metrics.jsonl; a resume continues the same W&B and MLflow runs; a missing
package stops the run before the model loads; a sink failing mid-run costs one line, not the run.

The W&B offline transaction log (``run-<id>.wandb``) is read back with wandb's own reader, ``wandb leet inspect
--json`` (one JSON object per record); MLflow's store with ``MlflowClient.get_metric_history``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _run_helpers import one_line, run_cli, run_process, write_recipe

os.environ.setdefault("OMP_NUM_THREADS", "1")


def logging_recipe(tmp_path: Path, model_dir, name: str, wandb: bool = True, mlflow: bool = True,
                   **training) -> Path:
    """A tiny-model recipe that logs to W&B (mode from WANDB_MODE) and an MLflow file store under tmp_path, with a
    held-out eval every 2 steps so eval_* records are in the series too."""
    path = write_recipe(tmp_path, model_dir, name, **training)
    tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    tree["data"]["eval_fraction"] = 0.2
    tree["eval"] = {"every_steps": 2}
    tree["logging"] = {}
    if wandb:
        tree["logging"]["wandb"] = {"project": "onecard-tests", "tags": ["tiny"]}
    if mlflow:
        tree["logging"]["mlflow"] = {"tracking_uri": mlflow_uri(tmp_path), "experiment": "tiny"}
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def mlflow_uri(tmp_path: Path) -> str:
    return f"file:{tmp_path / 'mlruns'}"


@pytest.fixture()
def offline_trackers(tmp_path, monkeypatch):
    """W&B offline into tmp_path/wandb-dir; MLflow's file store allowed (MLflow 3 refuses it unless told)."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / "wandb-dir").mkdir()
    return tmp_path / "wandb-dir"


# --------------------------------------------------------------------------- reading the trackers back


def metrics_series(run_dir: Path) -> dict[tuple[str, int], float]:
    """(name, step) -> value of every number metrics.jsonl holds (``step`` itself left out)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        out.update({(k, record["step"]): v for k, v in record.items() if k != "step" and isinstance(v, (int, float))})
    return out


def wandb_runs(wandb_dir: Path) -> list[dict]:
    """Each offline run's records, oldest first: {"log": the .wandb file, "run": run record, "history": {(name,
    step): value}, "files": [paths], "config": config, "exit": exit record} (what the file holds of those)."""
    out = []
    for log in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        lines = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)], check=True,
                               capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL).stdout
        run = {"log": log, "history": {}, "files": []}
        for record in map(json.loads, lines.splitlines()):
            kind = record["type"]
            if kind == "run":
                run["run"] = record["run"]
            elif kind == "history":
                step = int(record["history"]["step"]["num"])
                run["history"].update({(k, step): v for k, v in record["history"]["item"].items()
                                       if not k.startswith("_")})
            elif kind == "files":
                run["files"] += [f["path"] for f in record["files"]["files"]]
            elif kind == "config":
                run.setdefault("config", {}).update(record["config"]["update"])
            elif kind == "exit":
                run["exit"] = record["exit"]
        out.append(run)
    return out


def mlflow_series(uri: str, run_id: str) -> dict[tuple[str, int], float]:
    """(name, step) -> value over the run's whole metric history; a step logged twice fails the test."""
    from mlflow.tracking import MlflowClient

    client, out = MlflowClient(uri), {}
    for key in client.get_run(run_id).data.metrics:
        for metric in client.get_metric_history(run_id, key):
            assert (key, metric.step) not in out, f"MLflow holds {key} at step {metric.step} twice"
            out[(key, metric.step)] = metric.value
    return out


def stored_ids(run_dir: Path) -> dict:
    return json.loads((run_dir / "sinks.json").read_text(encoding="utf-8"))


def only(series: dict, name: str) -> dict:
    return {k: v for k, v in series.items() if k[0] == name}


# --------------------------------------------------------------------------- the tests


def test_wandb_offline_and_mlflow_store_hold_the_metrics_jsonl_series(tmp_path, tiny_llama_dir, offline_trackers):
    from mlflow.tracking import MlflowClient

    recipe = logging_recipe(tmp_path, tiny_llama_dir, "both")
    done = run_process(["train", recipe])
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "both"
    want = metrics_series(run_dir)
    assert {k for k, _ in want} >= {"loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"}
    assert len(only(want, "loss")) == 6 and len(only(want, "eval_loss")) == 3

    (wandb_run,) = wandb_runs(offline_trackers)
    assert wandb_run["history"] == want  # every name at every step, bit for bit
    assert wandb_run["run"]["run_id"] == stored_ids(run_dir)["wandb_run_id"]
    assert wandb_run["run"]["project"] == "onecard-tests" and wandb_run["run"]["tags"] == ["tiny"]
    assert wandb_run["run"]["display_name"] == "both" and wandb_run["exit"].get("exit_code", 0) == 0
    config = wandb_run["config"]
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert config["recipe"]["training"]["learning_rate"] == 1e-2 and config["recipe"]["logging"]["mlflow"]
    assert config["plan"]["total_bytes"] == summary["plan"]["total_bytes"]
    assert "recipe.yaml" in wandb_run["files"]

    uri, run_id = mlflow_uri(tmp_path), stored_ids(run_dir)["mlflow_run_id"]
    assert mlflow_series(uri, run_id) == want
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "both"
    assert run.data.params["recipe.training.learning_rate"] == "0.01"
    assert run.data.params["plan.total_bytes"] == str(summary["plan"]["total_bytes"])
    assert [a.path for a in MlflowClient(uri).list_artifacts(run_id)] == ["recipe.yaml"]


def test_resume_continues_the_same_runs_and_logs_each_step_once(tmp_path, tiny_llama_dir, offline_trackers):
    """Killed after logging steps 3-4 with only step 2's checkpoint left: --resume redoes steps 3-4, and each
    tracker ends with the loss series of metrics.jsonl under the run id it started with."""
    from onecard.train.spine import CRASH_ENV

    recipe = logging_recipe(tmp_path, tiny_llama_dir, "resumed", save_every_steps=2)
    killed = run_process(["train", recipe], prelude=f"import os; os.environ[{CRASH_ENV!r}] = '4'")
    assert killed.returncode == 17, killed.stderr[-3000:]
    run_dir = tmp_path / "runs" / "resumed"
    first_ids = stored_ids(run_dir)
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step-4")  # as if killed before step 4's checkpoint was written
    (checkpoints / "latest").write_text("step-2", encoding="utf-8")

    resumed = run_process(["train", recipe, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert stored_ids(run_dir) == first_ids
    want = only(metrics_series(run_dir), "loss")
    assert sorted(step for _, step in want) == [1, 2, 3, 4, 5, 6]

    got = mlflow_series(mlflow_uri(tmp_path), first_ids["mlflow_run_id"])  # fails on a step held twice
    assert only(got, "loss") == want

    runs = wandb_runs(offline_trackers)
    assert [r["log"].name for r in runs] == [f"run-{first_ids['wandb_run_id']}.wandb"] * 2
    assert runs[1]["run"]["run_id"] == first_ids["wandb_run_id"] and runs[1]["run"]["resume"] is True
    # the killed process's offline file may have lost its records (wandb-core had not flushed them; seen with
    # wandb 0.31: the header only): the resumed one holds the whole series
    assert only(runs[1]["history"], "loss") == want
    for key, value in only(runs[0]["history"], "loss").items():
        assert want[key] == value


@pytest.mark.parametrize("section,extra", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_missing_package_stops_before_the_model_loads(tmp_path, tiny_llama_dir, capsys, monkeypatch, section,
                                                      extra):
    from onecard.train import model

    monkeypatch.setitem(sys.modules, section, None)  # import and find_spec both see it absent
    monkeypatch.setattr(model, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    recipe = logging_recipe(tmp_path, tiny_llama_dir, "missing", wandb=section == "wandb",
                            mlflow=section == "mlflow")
    code, _, err = run_cli(["train", recipe], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"logging.{section} is set but the {section} package is not installed" in one_line(err)
    assert f"pip install 'onecard[{extra}]'" in one_line(err)
    assert not (tmp_path / "runs").exists()


def test_a_tracking_uri_mlflow_refuses_stops_before_the_model_loads(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    from onecard.train import model

    monkeypatch.setattr(model, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    recipe = logging_recipe(tmp_path, tiny_llama_dir, "bad-uri", wandb=False)
    code, _, err = run_cli(["train", recipe, "--set", "logging.mlflow.tracking_uri=nosuch://store"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "MLflow cannot use the tracking URI nosuch://store" in one_line(err)
    assert "logging.mlflow.tracking_uri" in one_line(err)


FAIL_WANDB_AT_STEP_3 = """
import wandb.sdk.wandb_run as wandb_run
real_log = wandb_run.Run.log
def log(self, data, step=None, **kwargs):
    if step == 3:
        raise ConnectionError("W&B went away")
    return real_log(self, data, step=step, **kwargs)
wandb_run.Run.log = log
"""


def test_a_sink_failing_mid_run_costs_one_line_not_the_run(tmp_path, tiny_llama_dir, offline_trackers):
    recipe = logging_recipe(tmp_path, tiny_llama_dir, "flaky")
    done = run_process(["train", recipe], prelude=FAIL_WANDB_AT_STEP_3)
    assert done.returncode == 0, done.stderr[-3000:]
    text = one_line(done.stdout + done.stderr)
    assert text.count("wandb logging failed at step 3 (ConnectionError: W&B went away); it is off for the rest of "
                      "this run, metrics.jsonl has every step") == 1
    run_dir = tmp_path / "runs" / "flaky"
    want = metrics_series(run_dir)
    assert sorted(step for _, step in only(want, "loss")) == [1, 2, 3, 4, 5, 6]
    assert mlflow_series(mlflow_uri(tmp_path), stored_ids(run_dir)["mlflow_run_id"]) == want  # the others go on
    (wandb_run,) = wandb_runs(offline_trackers)
    assert max(step for _, step in wandb_run["history"]) == 2  # W&B stopped where it failed
    assert wandb_run["exit"]["exit_code"] == 1  # and its run was closed as failed


def test_logging_section_defaults_and_errors(tmp_path):
    from onecard.errors import UserError
    from onecard.recipe import load_recipe

    plain = load_recipe(None, ["model.name_or_path=llama-3-8b"])
    assert plain.logging.tensorboard is True and plain.logging.wandb is None and plain.logging.mlflow is None
    on = load_recipe(None, ["model.name_or_path=llama-3-8b", "logging.wandb.mode=offline", "logging.mlflow={}"])
    assert on.logging.wandb.mode == "offline" and on.logging.mlflow.tracking_uri is None
    with pytest.raises(UserError) as err:
        load_recipe(None, ["model.name_or_path=llama-3-8b", "logging.wandb.projekt=x"])
    assert "logging.wandb.projekt: unknown field" in str(err.value) and "did you mean 'project'" in err.value.fix
    with pytest.raises(UserError, match="logging.wandb.mode"):
        load_recipe(None, ["model.name_or_path=llama-3-8b", "logging.wandb.mode=sometimes"])


def test_the_readme_logging_example_is_a_valid_recipe_section():
    from onecard.recipe import validate_recipe

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("**Logging.**", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    recipe = validate_recipe({"model": {"name_or_path": "llama-3-8b"}, **yaml.safe_load(block)})
    assert recipe.logging.wandb.project == "my-project" and recipe.logging.mlflow.experiment == "chat"
