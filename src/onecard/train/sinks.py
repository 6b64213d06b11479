"""The one place where metrics fan out beyond ``metrics.jsonl``: TensorBoard, Weights & Biases, MLflow (``logging:``).

train/metrics.py writes each record to metrics.jsonl first (the record of truth), then hands it to :class:`Sinks`.
Every sink gets the same records: the same names (``loss``, ``lr``, ``grad_norm``, ``eval_loss``, ...) at the same
steps; TensorBoard keeps its ``train/`` prefix. Each sink goes through its library (wandb, mlflow, torch's
SummaryWriter); nothing here talks to a server itself.
- A configured W&B or MLflow whose package is missing, or a tracking URI MLflow refuses, stops ``onecard train``
  before the model loads (:func:`require_sinks`, exit 2).
- A sink that fails later (network, server, disk) is switched off with one line and training goes on: metrics.jsonl
  still has every step. TensorBoard is on by default, so a missing tensorboard package is such a line, not a stop.
- The W&B and MLflow run ids are kept in ``<run_dir>/sinks.json``, so ``--resume`` continues the same runs (W&B:
  the same id with ``resume="allow"``; MLflow: the same run id). On resume every sink is first handed the records
  restored from the checkpoint and logs those it does not hold: a process killed hard (``os._exit``, SIGKILL) may
  have lost its last records in W&B's offline file or TensorBoard's unflushed events, and may have sent steps past
  its checkpoint that the resumed run logs again. Each sink ends with the series of metrics.jsonl, each step once.
The recipe and the memory plan go in as W&B config / MLflow params, ``recipe.yaml`` as a run file / artifact.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from onecard.errors import UserError
from onecard.recipe import Recipe

STATE_FILE = "sinks.json"
MLFLOW_STATUS = {"finished": "FINISHED", "killed": "KILLED", "failed": "FAILED"}
MLFLOW_BATCH_PARAMS = 100  # MLflow's limit on params per log_batch (mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH)
# MLflow's name rule (mlflow.utils.validation): the plan's component labels have parentheses, "weights (bf16)"
MLFLOW_KEY_REFUSED = re.compile(r"[^\w\-. :/]")
MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl record that a sink logs: every numeric field but ``step``."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


def run_config(recipe: Recipe) -> dict[str, Any]:
    """What a run tracker records as the run's configuration: the resolved recipe and the memory plan
    (the same plan as summary.json's)."""
    from onecard.train.summary import planned_memory

    return {"recipe": recipe.model_dump(mode="json"), "plan": planned_memory(recipe)}


# --------------------------------------------------------------------------- before the model loads


def require_sinks(recipe: Recipe) -> None:
    """Refuse, before any work, a configured sink that cannot run: its package missing, MLflow's URI refused."""
    if recipe.logging.wandb is not None:
        _require_package("wandb", "wandb", "logging.wandb")
    if recipe.logging.mlflow is not None:
        _require_package("mlflow", "mlflow", "logging.mlflow")
        _check_tracking_uri(recipe.logging.mlflow.tracking_uri)


def _require_package(module: str, extra: str, field: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{field} is set but the {module} package is not installed", where=field,
                        fix=f"pip install 'onecard[{extra}]' (or remove {field} from the recipe)")


def _check_tracking_uri(uri: str | None) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri)  # builds the tracking store, which is where MLflow refuses a URI
    except MlflowException as exc:
        first = str(exc.message).split(". ")[0]
        raise UserError(f"MLflow cannot use the tracking URI {uri or '(its default)'}: {first}",
                        where="logging.mlflow.tracking_uri",
                        fix="give a tracking server (http://host:5000) or, with MLFLOW_ALLOW_FILE_STORE=true, a "
                        "file:/path store; a sqlite: URI needs the full mlflow package") from None


# --------------------------------------------------------------------------- the fan-out


class Sinks:
    """The configured sinks of one run. ``records``: those restored from the checkpoint (empty on a new run)."""

    def __init__(self, recipe: Recipe, records: list[dict[str, Any]], console=None):
        self._console = console
        self._state_path = recipe.run_dir / STATE_FILE
        state = json.loads(self._state_path.read_text(encoding="utf-8")) if self._state_path.is_file() else {}
        self._active: list[Any] = []
        for sink in configured(recipe):
            try:
                sink.open(recipe, state, restored=bool(records))
            except Exception as exc:  # noqa: BLE001 -- a tracker must not stop training; said in one line
                self._say(f"{sink.name} could not start ({_brief(exc)}); training goes on without it, metrics.jsonl "
                          "has every step")
                continue
            self._active.append(sink)
            for record in records:
                if not self._send(sink, record):
                    break
        if state:
            from onecard.train.rundir import write_json_atomic

            write_json_atomic(self._state_path, state)

    def log(self, record: dict[str, Any]) -> None:
        for sink in list(self._active):
            self._send(sink, record)

    def close(self, outcome: str = "finished") -> None:
        """``outcome``: finished, killed (a signal; resumable) or failed."""
        for sink in self._active:
            try:
                sink.close(outcome)
            except Exception as exc:  # noqa: BLE001 -- the run's own files are already written
                self._say(f"{sink.name} did not close cleanly ({_brief(exc)})")
        self._active = []

    def _send(self, sink, record: dict[str, Any]) -> bool:
        """Log one record to one sink; a failure switches the sink off (closed as failed, if it can be)."""
        try:
            sink.log(record["step"], scalars(record))
            return True
        except Exception as exc:  # noqa: BLE001 -- see the module docstring
            self._active.remove(sink)
            self._say(f"{sink.name} logging failed at step {record['step']} ({_brief(exc)}); it is off for the rest "
                      "of this run, metrics.jsonl has every step")
        try:
            sink.close("failed")
        except Exception:  # noqa: BLE001 -- it has already failed once, and said so
            pass
        return False

    def _say(self, text: str) -> None:
        if self._console is None:
            print(text, file=sys.stderr)
            return
        from rich.text import Text

        self._console.print(Text(text, style="yellow"))


def configured(recipe: Recipe) -> list[Any]:
    cfg = recipe.logging
    return ([TensorBoardSink()] if cfg.tensorboard else []) + ([WandbSink()] if cfg.wandb is not None else []) + \
        ([MlflowSink()] if cfg.mlflow is not None else [])


def _brief(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


# --------------------------------------------------------------------------- one class per sink
# open(recipe, state, restored): ``state`` is sinks.json, where a sink keeps its run id; ``restored``: the run is
# resumed and the restored records come next, some of which the sink may hold. log(step, scalars). close(outcome).


class TensorBoardSink:
    name = "tensorboard"

    def open(self, recipe: Recipe, state: dict, restored: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the earlier event files' steps from 1 on, which the restored records replace
        self._writer = SummaryWriter(log_dir=str(recipe.run_dir / "tb"), purge_step=1 if restored else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._writer.add_scalar(f"train/{key}", value, step)

    def close(self, outcome: str) -> None:
        self._writer.close()


class WandbSink:
    name = "wandb"

    def open(self, recipe: Recipe, state: dict, restored: bool) -> None:
        import wandb

        cfg = recipe.logging.wandb
        run_id = state.get("wandb_run_id")
        if cfg.dir:
            Path(cfg.dir).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or recipe.name, mode=cfg.mode,
                               tags=cfg.tags or None, group=cfg.group, notes=cfg.notes, dir=cfg.dir, id=run_id,
                               resume="allow" if run_id else None)
        self._run.config.update(run_config(recipe), allow_val_change=True)  # a resume may carry a changed recipe
        self._run.save(str(recipe.run_dir / "recipe.yaml"), base_path=str(recipe.run_dir), policy="now")
        state["wandb_run_id"] = self._run.id
        # online, a resumed run starts after the last step the server holds; offline (and new) at 0
        self._first_step = self._run.starting_step

    def log(self, step: int, values: dict[str, float]) -> None:
        if step >= self._first_step:
            self._run.log(values, step=step)

    def close(self, outcome: str) -> None:
        self._run.finish(exit_code=0 if outcome == "finished" else 1)


class MlflowSink:
    name = "mlflow"

    def open(self, recipe: Recipe, state: dict, restored: bool) -> None:
        from mlflow.tracking import MlflowClient

        cfg = recipe.logging.mlflow
        self._client = MlflowClient(cfg.tracking_uri)
        self._logged_through: dict[str, int] = {}
        run_id = state.get("mlflow_run_id")
        if run_id is None or not self._continue(run_id):
            name = cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
            found = self._client.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found is not None else self._client.create_experiment(name)
            run_id = self._client.create_run(experiment_id, run_name=cfg.run_name or recipe.name,
                                             tags=cfg.tags).info.run_id
            self._log_params(run_id, run_config(recipe))  # params are immutable in MLflow: set once per run
        self._run_id = state["mlflow_run_id"] = run_id
        self._client.log_artifact(run_id, str(recipe.run_dir / "recipe.yaml"))

    def _continue(self, run_id: str) -> bool:
        """Reopen a stored run; False when the store does not hold it (then a new run is started)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        self._client.update_run(run_id, status="RUNNING")
        # what the run holds, so that the restored records and the steps a killed process logged after its last
        # checkpoint are not kept twice (MLflow keeps every value logged)
        self._logged_through = {key: max(m.step for m in self._client.get_metric_history(run_id, key))
                                for key in run.data.metrics}
        return True

    def _log_params(self, run_id: str, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(MLFLOW_KEY_REFUSED.sub("_", key), value[:MLFLOW_PARAM_CHARS])
                  for key, value in _flatten(config).items()]
        for start in range(0, len(params), MLFLOW_BATCH_PARAMS):
            self._client.log_batch(run_id, params=params[start:start + MLFLOW_BATCH_PARAMS])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now_ms, step) for key, value in values.items()
                   if step > self._logged_through.get(key, -1)]
        if metrics:
            self._client.log_batch(self._run_id, metrics=metrics)

    def close(self, outcome: str) -> None:
        self._client.set_terminated(self._run_id, status=MLFLOW_STATUS[outcome])


def _flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config as MLflow params: dotted keys, values as text (JSON for lists and null)."""
    if isinstance(tree, dict) and tree:
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree if isinstance(tree, str) else json.dumps(tree)}
