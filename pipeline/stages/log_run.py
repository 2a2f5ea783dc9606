"""Stage log-run (`python -m pipeline log-run <model>`): a finished training stage's DVC outputs as a
new MLflow run, for a stage whose tracking server was lost.

Params come from the config, the per-epoch metrics from plots/<name>/history.csv, the kept epoch's metrics
from metrics/<name>.json, the model from models/<name>/model.pt (when train.log_model), the history
and learning curves as artifacts. models/<name>/mlflow.json then points at the new run.
"""

from __future__ import annotations

import json

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from pipeline import data, models, paths, plots, tracking
from pipeline.config import Config
from pipeline.errors import ModelFileError


def run(config: Config, name: str) -> str:
    """Record the stage train_<name> as a new run. Returns what was done, for the user."""
    tracking.require_tracking(f"log-run {name}")
    stage = f"train_{name}"
    for needed in (paths.model_file(name), paths.metrics_file(name), paths.history_file(name)):
        if not needed.exists():
            raise ModelFileError(f"{needed} not found: {stage} has not finished, there is nothing to log "
                                 f"(run it: dvc repro {stage})")
    model, _ = models.load_trained(config, name)  # log-run records the params it is given: they must be the model's
    history = pd.read_csv(paths.history_file(name))
    tracking_file = paths.model_tracking_file(name)
    previous = json.loads(tracking_file.read_text()) if tracking_file.exists() else {}
    stats = data.load_stats(paths.NORMALIZED)
    splits = {split: data.load_split(paths.NORMALIZED, split) for split in ("train", "val")}

    client = MlflowClient()
    try:
        with tracking.stage_run(config, stage, run_name=name) as run:
            run_id = run.info.run_id
            mlflow.set_tag(tracking.RELOGGED_FROM_TAG, previous.get("run_id") or "none")
            # What the stage records as it runs, from the same files and through the same functions.
            tracking.record_inputs(config, name, splits, stats)
            tracking.record_epochs(history)
            model_uri = tracking.record_outputs(config, name, plots.learning_curves({name: history}),
                                                model if config.train.log_model else None,
                                                splits["val"].images[:4].astype("float32"))
    except Exception as exc:  # the server went away again: nothing local changed, so simply rerun
        raise tracking.TrackingError(
            f"log-run {name} failed against {tracking.shown_uri()}: {tracking.failure_reason(exc)}. "
            f"{tracking_file} is unchanged; run `python -m pipeline log-run {name}` again once the server answers "
            "(the partial run it leaves is marked FAILED when the server allows)") from exc
    tracking_file.parent.mkdir(parents=True, exist_ok=True)
    tracking_file.write_text(json.dumps(
        {"run_id": run_id, "model_uri": model_uri, "experiment": config.train.experiment, "complete": True,
         "relogged_from": previous.get("run_id")}, indent=2) + "\n")

    old = previous.get("run_id")
    if old:  # point the incomplete run at its replacement, if this store has it
        try:
            with tracking.http_limits(**tracking.CHECK_HTTP, override=True):
                client.set_tag(old, tracking.RELOGGED_AS_TAG, run_id)
                if client.get_run(old).info.status == "RUNNING":
                    client.set_terminated(old, "FAILED")
        except Exception:
            pass  # another store, or deleted: nothing to point
    return (f"logged {stage}'s outputs as MLflow run {run_id} in {tracking.shown_uri()} (experiment "
            f"{config.train.experiment}): params, {len(history)} epochs of metrics, the kept epoch's metrics, "
            f"artifacts{', model ' + model_uri if model_uri else ''}.\n"
            f"{tracking_file} now points at it. Under DVC, record that change without retraining: "
            f"dvc commit -f {stage}")
