"""MLflow records: one run per stage, grouped under a parent run per pipeline configuration.

Tracking goes to MLFLOW_TRACKING_URI when set, else to sqlite:///mlflow.db at the project root
(also from DVC's queued experiments, which run in a temporary copy of the project).

A shared tracking server can be down or go away. A stage checks that the store answers before it
trains (`require_tracking`); once training has started, a lost server costs records, never the
trained model: `StageLog` bounds and records every MLflow call, and the log-run stage
(pipeline/stages/log_run.py) records a finished stage's DVC outputs as a new run afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import sqlite3
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import mlflow
from mlflow.exceptions import MlflowException
import numpy as np
import pandas as pd
import torch
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from pipeline import paths
from pipeline.config import Config, flatten
from pipeline.data import Split
from pipeline.errors import PipelineError
from pipeline.paths import MODEL_NAMES
from pipeline.device import device_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GROUP_TAG = "pipeline.group"
PARENT_TAG = "pipeline.parent"
INCOMPLETE_TAG = "pipeline.incomplete"  # on a run that a lost server left without some of its records
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"  # what the UI opens on
RELOGGED_FROM_TAG = "pipeline.relogged_from"  # on a run made by log-run: the run it replaces
RELOGGED_AS_TAG = "pipeline.relogged_as"  # on the replaced run, when the server still has it
# Set by `python -m pipeline repro` (MLproject's main entry point) for the stages DVC runs: the run of
# `mlflow run`, under which each stage's run is nested.
PARENT_RUN_ENV = "PIPELINE_PARENT_RUN_ID"

# MLflow reads its HTTP retry settings at each request. Its defaults (7 retries, exponential backoff,
# 120 s timeout) suit a rate-limited hosted service but make a dead self-hosted server cost minutes
# per call. Stages use these bounds unless the user exported MLFLOW_HTTP_REQUEST_* themselves.
STAGE_HTTP = {"max_retries": 2, "backoff_factor": 1, "timeout": 60}
CHECK_HTTP = {"max_retries": 1, "backoff_factor": 1, "timeout": 10}  # the reachability check: always quick
DEGRADED_HTTP = {"max_retries": 0, "backoff_factor": 1, "timeout": 5}  # after a failed call: one quick try


class TrackingError(PipelineError, RuntimeError):
    """The MLflow tracking store cannot be reached."""


@contextmanager
def http_limits(max_retries: int, backoff_factor: int, timeout: int, override: bool = False) -> Iterator[None]:
    """MLflow's HTTP retry settings for the duration of the block (settings the user exported win
    unless `override`); restored afterwards."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": max_retries, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": backoff_factor,
              "MLFLOW_HTTP_REQUEST_TIMEOUT": timeout}
    saved = {key: os.environ.get(key) for key in wanted}
    for key, value in wanted.items():
        if override or saved[key] is None:
            os.environ[key] = str(value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def shown_uri(uri: str | None = None) -> str:
    """The tracking URI without a password in it."""
    return re.sub(r"//[^/@]*@", "//***@", uri or mlflow.get_tracking_uri())


def failure_reason(exc: BaseException) -> str:
    """One short line for an MLflow/requests error, whose messages run to several hundred characters."""
    text = str(exc)
    for needle, short in (("Connection refused", "connection refused"),
                          ("timed out", "no answer within the timeout"),
                          ("Name or service not known", "unknown host"),
                          ("Connection reset", "connection reset"),
                          ("RemoteDisconnected", "the server closed the connection")):
        if needle in text:
            return short
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200] + ("..." if len(first) > 200 else "")


def quiet_store_logs() -> None:
    """Keep the SQL store's INFO lines (table creation, migrations) out of the stages' output, unless
    the user asked MLflow for them with MLFLOW_LOGGING_LEVEL."""
    if not os.environ.get("MLFLOW_LOGGING_LEVEL"):
        for name in ("alembic", "mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store"):
            logging.getLogger(name).setLevel(logging.WARNING)


def use_project_store() -> None:
    """Without MLFLOW_TRACKING_URI, record into mlflow.db at the project root.

    MLflow's own default is relative to the working directory, and DVC runs queued experiments in a
    temporary copy under .dvc/tmp/exps/ that it deletes afterwards, taking their runs with it.
    """
    quiet_store_logs()
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    root = Path.cwd().resolve().as_posix().split("/.dvc/tmp/exps/")[0]
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")


def backup_store(target: Path) -> None:
    """A consistent copy of a sqlite tracking store (sqlite's backup API), so that it can travel mid-run;
    nothing for a tracking server."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    tmp = target.with_name(target.name + ".tmp")
    with sqlite3.connect(uri.removeprefix("sqlite:///")) as source, sqlite3.connect(tmp) as copy:
        source.backup(copy)
    tmp.replace(target)


def require_tracking(stage: str) -> str:
    """Fail now, before any work, if the tracking store does not answer (bounded: seconds, not minutes)."""
    use_project_store()
    uri = shown_uri()
    try:
        with http_limits(**CHECK_HTTP, override=True):
            MlflowClient().search_experiments(max_results=1)
    except Exception as exc:
        if os.environ.get("MLFLOW_TRACKING_URI"):
            where = "MLFLOW_TRACKING_URI"
            fix = ("start the tracking server (see README, 'Shared tracking server') or correct "
                   "MLFLOW_TRACKING_URI; or `unset MLFLOW_TRACKING_URI` to record into the local "
                   "sqlite:///mlflow.db instead")
        else:
            where = "the local default"
            fix = "make the working directory writable (the local store is mlflow.db there), or set MLFLOW_TRACKING_URI"
        raise TrackingError(
            f"the MLflow tracking store {uri} ({where}) is not reachable: {failure_reason(exc)}. "
            f"{stage} did not start; nothing was trained or written. To fix: {fix}."
        ) from exc
    return uri


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'"""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


class StageLog:
    """The MLflow calls of a training stage once its run is open.

    A lost tracking server must not lose the trained model, so no call here raises: each one is
    bounded (STAGE_HTTP), a failed one is recorded and skipped, and after a failure the next calls
    get a single quick try each (DEGRADED_HTTP) until one succeeds again. Nothing is queued or
    retried later in this process: `report` says what is missing and how to log it afterwards.
    """

    def __init__(self, name: str):
        self.name = name
        self.missed_epochs: list[int] = []
        self.missed: list[str] = []
        self.first_error: str | None = None
        self._failing = False

    def attempt(self, what: str, fn, *args, **kwargs) -> tuple[bool, object]:
        """(True, fn(*args, **kwargs)), or (False, None) when MLflow failed; bounded, never raises."""
        try:
            with http_limits(**(DEGRADED_HTTP if self._failing else STAGE_HTTP), override=self._failing):
                result = fn(*args, **kwargs)
        except Exception as exc:
            if self.first_error is None:
                self.first_error = failure_reason(exc)
                print(f"warning: MLflow ({shown_uri()}) did not record {what}: {self.first_error}. Training goes on "
                      "and its DVC outputs will be complete; what MLflow misses is listed at the end",
                      file=sys.stderr, flush=True)
            self._failing = True
            return False, None
        self._failing = False
        return True, result

    def do(self, what: str, fn, *args, **kwargs):
        """fn(*args, **kwargs): its result, or None when MLflow failed (`what` is then listed as not logged)."""
        ok, result = self.attempt(what, fn, *args, **kwargs)
        if not ok:
            self.missed.append(what)
        return result

    def epoch(self, record: dict) -> None:
        """fit's on_epoch: the epoch's metrics, at step = epoch."""
        ok, _ = self.attempt(f"the metrics of epoch {record['epoch']}", mlflow.log_metrics, epoch_metrics(record),
                              step=record["epoch"])
        if not ok:
            self.missed_epochs.append(int(record["epoch"]))

    @property
    def complete(self) -> bool:
        return not self.missed and not self.missed_epochs

    def not_logged(self) -> list[str]:
        items = [f"metrics of epoch{'s' if len(self.missed_epochs) > 1 else ''} {_ranges(self.missed_epochs)}"] \
            if self.missed_epochs else []
        return items + self.missed

    def status(self) -> dict:
        """For models/<name>/mlflow.json."""
        if self.complete:
            return {"complete": True}
        return {"complete": False, "not_logged": self.not_logged(), "error": self.first_error,
                "relog": f"python -m pipeline log-run {self.name}"}

    def report(self, outputs: list[str]) -> None:
        """Say, loudly and on stderr, what MLflow is missing and the command that records it."""
        if self.complete:
            return
        lines = [
            "",
            f"WARNING: train_{self.name} finished, but the MLflow tracking store {shown_uri()} did not record: "
            + "; ".join(self.not_logged()) + f" (first error: {self.first_error}).",
            f"The DVC outputs are complete: {', '.join(outputs)}; models/{self.name}/mlflow.json says "
            '"complete": false.',
            "This stage exits 0 on purpose: its outputs are complete, and a failure would leave them unrecorded "
            "by DVC, so that the next `dvc repro` would train again.",
            "To record these outputs as a new MLflow run once the tracking server is back (same params):",
            f"    python -m pipeline log-run {self.name}",
            "",
        ]
        print("\n".join(lines), file=sys.stderr, flush=True)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_tags() -> dict[str, str]:
    """The commit, under MLflow's own tag (which MLflow sets on the runs it starts, but not on parent runs
    made with the client, and which a resumed run must update), and whether tracked files differ from it."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {**({"mlflow.source.git.commit": commit} if commit else {}),
            "git.dirty": "unknown" if status is None else str(bool(status)).lower()}


def group_id(config: Config) -> str:
    """The same commit and the same params give the same group: the runs of one `dvc repro`."""
    key = f"{_git('rev-parse', 'HEAD')}:{config.model_dump_json()}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def environment_tags(device: torch.device | None = None) -> dict[str, str]:
    tags = {
        "torch.version": torch.__version__,
        "torch.cuda": str(torch.version.cuda),
        "python.version": platform.python_version(),
    }
    if device is not None:
        tags["device"] = device_name(device)
    return tags


def data_tags(stats: dict) -> dict[str, str]:
    return {
        "data.archive_md5": stats["archive_md5"],
        "data.norm_mean": ",".join(f"{v:.4f}" for v in stats["mean"]),
        "data.norm_std": ",".join(f"{v:.4f}" for v in stats["std"]),
    }


def artifact_root() -> str | None:
    """Where a new experiment of a local store keeps its artifacts: mlruns/ beside the store's file.

    MLflow's default is relative to the working directory, and DVC runs `dvc exp run --temp` and queued
    experiments in a copy that it deletes afterwards, with every artifact logged there. None for a
    tracking server, which decides for itself."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    return None


def use_experiment(name: str):
    """mlflow.set_experiment, creating the experiment first (if new) with its artifacts at artifact_root()."""
    client = MlflowClient()
    if client.get_experiment_by_name(name) is None and (root := artifact_root()) is not None:
        try:
            client.create_experiment(name, artifact_location=f"{root}/{re.sub(r'[^A-Za-z0-9._-]', '_', name)}")
        except MlflowException:
            pass  # created meanwhile by another stage: set_experiment finds it
    return mlflow.set_experiment(name)


def parent_run(config: Config) -> str:
    """The parent run of this configuration's group in the params' experiment, found or created."""
    client = MlflowClient()
    experiment = use_experiment(config.train.experiment)
    experiment_id = experiment.experiment_id
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
        # Without it, MLflow 3's UI opens the experiment on its GenAI pages (traces), not on the runs.
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    group = group_id(config)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{GROUP_TAG}` = '{group}' and tags.`{PARENT_TAG}` = 'true'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    parent = client.create_run(
        experiment_id, run_name=f"pipeline {group}", tags={GROUP_TAG: group, PARENT_TAG: "true", **git_tags()}
    )
    client.log_batch(parent.info.run_id, params=[mlflow.entities.Param(k, str(v)[:6000])
                                                  for k, v in flatten(config.model_dump(mode="json")).items()])
    client.set_terminated(parent.info.run_id)
    return parent.info.run_id


HEADLINE = ("val_acc", "train_running_acc", "train_acc", "test_acc")  # per model, on the parent run


def model_metrics(name: str, figures: dict) -> dict:
    """A model's figures on a run that holds both models' (evaluate's, the parent's): `<model>/<figure>`,
    one chart section per model in MLflow's UI."""
    return {f"{name}/{key}": value for key, value in figures.items()}


def summarize_parent(parent_run_id: str, metrics: dict, if_missing: bool = False) -> None:
    """The headline of a pipeline on its parent run: each model's val, running and clean train and test
    accuracy and whether the targets hold; the run then ends now, so that its duration spans the stages.
    With if_missing, a run that has the headline already (its evaluate stage wrote it) is left as it is."""
    client = MlflowClient()
    if if_missing and f"{MODEL_NAMES[-1]}/{HEADLINE[0]}" in client.get_run(parent_run_id).data.metrics:
        return
    now = int(time.time() * 1000)
    figures = [mlflow.entities.Metric(key, float(value), now, 0) for name in MODEL_NAMES
               for key, value in model_metrics(name, {k: metrics[name][k] for k in HEADLINE}).items()]
    tags = [mlflow.entities.RunTag("all_targets_hold", str(metrics["all_targets_hold"]).lower())]
    client.log_batch(parent_run_id, metrics=figures, tags=tags)
    if client.get_run(parent_run_id).info.status != "RUNNING":  # under `mlflow run`, it ends the run itself
        client.set_terminated(parent_run_id, end_time=now)


@contextmanager
def stage_run(config: Config, stage: str, run_name: str, resume_run_id: str | None = None,
              parent_run_id: str | None = None, log: StageLog | None = None,
              system_metrics: bool = False) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of one stage.

    Inside `mlflow run` (MLFLOW_RUN_ID set) that run is the stage's run. A resumed training
    stage continues its own run. Otherwise a new run is nested under `parent_run_id`, else under the
    run named by PIPELINE_PARENT_RUN_ID (MLproject's main entry point, through DVC), else under the
    parent run of this configuration's group, found or created by the group tag.
    MLflow's HTTP calls are bounded (STAGE_HTTP) inside. With a `log`, ending the run cannot fail
    the stage: a run whose end the server did not record stays RUNNING there and is reported.
    `system_metrics`: MLflow samples CPU, memory and GPU use into the run while it is open.
    """
    system = {"log_system_metrics": True} if system_metrics else {}  # else MLflow's own default
    tags = {GROUP_TAG: group_id(config), "dvc.stage": stage, **git_tags(), **environment_tags()}
    with http_limits(**STAGE_HTTP):
        if resume_run_id is None and os.environ.get("MLFLOW_RUN_ID"):
            resume_run_id = os.environ["MLFLOW_RUN_ID"]
        if resume_run_id is not None:
            run = mlflow.start_run(run_id=resume_run_id, **system)
        else:
            parent = parent_run_id or os.environ.get(PARENT_RUN_ENV) or parent_run(config)
            # Children live in their parent's experiment (under `mlflow run`, the one it was given).
            experiment_id = MlflowClient().get_run(parent).info.experiment_id
            run = mlflow.start_run(run_name=run_name, parent_run_id=parent, experiment_id=experiment_id, tags=tags,
                                   **system)
        if log is None:
            with run:
                mlflow.set_tags(tags)
                yield run
            return
        try:
            mlflow.set_tags(tags)
            yield run
        except BaseException:
            log.attempt("the run's end", mlflow.end_run, "FAILED")  # the stage's own error is the one to see
            raise
        if not log.complete:  # best effort: the server may be back for the end of the run
            log.attempt("the run's incomplete tag", mlflow.set_tag, INCOMPLETE_TAG, "; ".join(log.not_logged()))
        log.do("the run's end (it stays RUNNING in the store)", mlflow.end_run)


def training_params(config: Config, name: str) -> dict:
    """The params a training run records: data, the shared train settings, and its own model's recipe
    without the `train.<model>.` prefix (`epochs`, `optimizer.lr`, `model.width`), so that MLflow's
    Compare runs lines the two models up; the run's `model` tag says which one it is."""
    return {"data": config.data.model_dump(mode="json"),
            "train": {k: v for k, v in config.train.model_dump(mode="json").items() if k not in MODEL_NAMES},
            **getattr(config.train, name).model_dump(mode="json")}


def log_params(params: dict) -> None:
    mlflow.log_params({k: str(v) for k, v in flatten(params).items()})


def log_datasets(splits: dict[str, Split], stats: dict, source: str) -> None:
    for context, split in splits.items():
        with warnings.catch_warnings():
            # MLflow registers two equivalent sources for local paths and warns that it picked one.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_numpy(
                split.images, targets=split.labels, source=source, name=f"cifar10-{context}",
                digest=f"{stats['archive_md5'][:8]}-{context}-{len(split.labels)}",
            )
        mlflow.log_input(dataset, context="training" if context == "train" else "validation")


def log_model(model: torch.nn.Module, example: np.ndarray) -> str:
    """Log a CPU float32 copy, loadable with mlflow.pytorch and mlflow.pyfunc on any machine. Returns its URI."""
    model = model.to("cpu", memory_format=torch.contiguous_format).float().eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        model, name="model", input_example=example, signature=infer_signature(example, output)
    )
    return info.model_uri


# MLflow's names for a training run's figures (history.csv and metrics/<name>.json keep the short ones).
# The part before "/" is the chart section in MLflow's UI, and sections come in alphabetical order: a
# run's page opens on accuracy and loss per epoch, then the kept epoch's figures, then speed. Counts and
# choices (epochs, the selected epoch, the parameter count) are params and tags, not metrics.
EPOCH_METRICS = {
    "train_running_acc": "accuracy/train_running", "train_clean_subset_acc": "accuracy/train_clean",
    "val_acc": "accuracy/val", "train_running_loss": "loss/train_running",
    "train_clean_subset_loss": "loss/train_clean", "val_loss": "loss/val",
    "lr": "optimizer/lr", "epoch_time_s": "speed/epoch_time_s", "images_per_s": "speed/images_per_s",
}
SELECTED_METRICS = {  # from metrics/<name>.json: the kept epoch's figures, and the training's totals
    "val_acc": "selected/val_acc", "train_running_acc": "selected/train_running_acc",
    "train_clean_subset_acc": "selected/train_clean_acc", "val_loss": "selected/val_loss",
    "train_running_loss": "selected/train_running_loss", "train_time_s": "speed/train_time_s",
    "images_per_s": "speed/median_images_per_s",
}


def epoch_metrics(record: dict) -> dict:
    """An epoch's record (a row of history.csv) as MLflow metrics; the epoch itself is the step."""
    return {EPOCH_METRICS[k]: v for k, v in record.items() if k in EPOCH_METRICS}


def call(what: str, fn, *args, **kwargs):
    """The plain caller of the record_* functions: `what` is only a label, and a failure propagates."""
    return fn(*args, **kwargs)


# A training run's records come from these two functions, whoever records: the train stage as it runs
# (through StageLog.do, which outlives a lost server and lists what it missed), and log-run afterwards
# (through the plain `call`, which fails as a whole). Both record the same things from the same files.

def record_inputs(config: Config, name: str, splits: dict[str, Split], stats: dict, do=call,
                  resumed: bool = False) -> None:
    """What a training run records before it trains: the model tag, the data's tags, the params and the
    datasets. A resumed run has its params and datasets; its tags are set again (a lost server may have
    missed them)."""
    do("the run's tags", mlflow.set_tags, {"model": name, **data_tags(stats)})
    if not resumed:
        do("the params", log_params, training_params(config, name))
        do("the datasets", log_datasets, splits, stats, str(paths.NORMALIZED))


def record_outputs(config: Config, name: str, curves: Figure, model: torch.nn.Module | None, example: np.ndarray,
                   do=call) -> str | None:
    """What a finished training stage recorded in its DVC outputs, recorded in MLflow: the kept epoch's
    metrics (metrics/<name>.json), the selection tags, history.csv, the learning curves drawn from it and, if
    given, the model loaded from models/<name>/model.pt (its URI is returned). The per-epoch metrics are not
    among them: the stage logs each epoch as it ends, log-run replays history.csv (`record_epochs`)."""
    recipe = getattr(config.train, name)
    summary = json.loads(paths.metrics_file(name).read_text())
    do("the selected epoch's metrics", mlflow.log_metrics, {SELECTED_METRICS[k]: summary[k] for k in SELECTED_METRICS})
    do("the selection tags", mlflow.set_tags, {"select": f"{recipe.select} -> epoch {summary['selected_epoch']}",
                                               "selected_epoch": summary["selected_epoch"],
                                               "parameters": summary["parameters"]})
    do("history.csv", mlflow.log_artifact, str(paths.history_file(name)))
    do("the learning curves", mlflow.log_figure, curves, "learning_curves.png")
    return None if model is None else do("the model", log_model, model, example)


def record_epochs(history: pd.DataFrame) -> None:
    """history.csv's per-epoch metrics at step = epoch, as the stage logged them while it trained."""
    now = int(time.time() * 1000)
    points = [mlflow.entities.Metric(key, float(value), now, int(row["epoch"]))
              for row in history.to_dict("records") for key, value in epoch_metrics(row).items()]
    run_id = mlflow.active_run().info.run_id
    for start in range(0, len(points), 1000):  # MLflow's limit per batch
        MlflowClient().log_batch(run_id, metrics=points[start:start + 1000])
