"""Stage evaluate: both models -> metrics/evaluate.json, plots/evaluate/, reports/, an MLflow run,
and the ResNet in the Model Registry (alias "champion" only when every target holds)."""

from __future__ import annotations

import json
import sys

import mlflow
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from pipeline import data, evaluate, models, paths, plots, tracking
from pipeline.config import Config
from pipeline.data import replacing_dir
from pipeline.models import ModelFileError
from pipeline.device import cpu_model, device_name, select_device, uses_bf16

CHAMPION = "champion"
HEADLINE = paths.METRICS / "headline.json"


def _trained(config: Config, name: str) -> tuple:
    model, _ = models.load_trained(config, name)
    for needed in (paths.metrics_file(name), paths.history_file(name), paths.model_tracking_file(name)):
        if not needed.exists():
            raise ModelFileError(f"{needed} not found: rerun the training stage (dvc repro train_{name})")
    summary, tracked = _record_of(paths.metrics_file(name), name), _record_of(paths.model_tracking_file(name), name)
    try:
        history = pd.read_csv(paths.history_file(name))
        if "epoch" not in history.columns:
            raise ValueError("no epoch column")
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{paths.history_file(name)} is not the training's history ({type(exc).__name__}): "
                             f"rerun the training stage (dvc repro train_{name})") from None
    return model, summary, history, tracked


def _record_of(path, name: str) -> dict:
    """A JSON object that the training stage wrote; a clear error if it is not one."""
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        record = exc
    if not isinstance(record, dict):
        raise ModelFileError(f"{path} is not the JSON object the training stage writes: it is corrupt or was "
                             f"replaced. Rerun the training stage (dvc repro train_{name})")
    return record


def run(config: Config, parent_run_id: str | None = None) -> dict:
    tracking.require_tracking("evaluate")  # before the work, not after it
    splits = {name: data.load_split(paths.NORMALIZED, name) for name in data.SPLITS}
    stats = data.load_stats(paths.NORMALIZED)
    classes = stats["classes"]
    device = select_device(config.train.device)
    bf16 = uses_bf16(config.train.precision, device)

    rows, histories, tracked = {}, {}, {}
    for name in paths.MODEL_NAMES:
        model, summary, histories[name], tracked[name] = _trained(config, name)
        rows[name] = evaluate.evaluate_model(model, splits, device, config.train.eval_batch_size, len(classes),
                                             bf16, label=name)
        print(f"{name}: clean train acc {rows[name]['train_acc']:.4f}, val acc {rows[name]['val_acc']:.4f}, "
              f"test acc {rows[name]['test_acc']:.4f}", flush=True)
        rows[name]["trained"] = summary
        if tracked[name].get("complete") is False:  # the tracking server was lost during training
            missing = "; ".join(tracked[name].get("not_logged", []))
            print(f"warning: the MLflow run of train_{name} is incomplete ({missing}): record the stage with "
                  f"`python -m pipeline log-run {name}`, then rerun evaluate", file=sys.stderr)
    targets = evaluate.check_targets(config, rows["resnet"], rows["resnet"]["trained"], classes)
    metrics = _metrics(rows, targets, device, bf16)
    table = evaluate.comparison_table(rows)
    _write_outputs(config, rows, histories, targets, table, classes, splits["test"].labels, device)
    with paths.replacing(paths.METRICS / "evaluate.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    with paths.replacing(HEADLINE) as tmp:
        tmp.write_text(json.dumps(headline(metrics), indent=2) + "\n")

    print(f"wrote {paths.REPORTS}/, {paths.PLOTS / 'evaluate'}/ and {paths.METRICS / 'evaluate.json'}; "
          "recording the evaluate run in MLflow", flush=True)
    registered = _record(config, metrics, tracked, stats, parent_run_id)
    print(table.to_string())
    print("all targets hold" if metrics["all_targets_hold"] else "not every target holds: see reports/report.md")
    if registered:
        print(registered)
    return metrics


def headline(metrics: dict) -> dict:
    """metrics/headline.json, what `dvc metrics show` lists (a line that fits a terminal): whether the
    targets hold and, per model, accuracy on validation and test, running (training-mode, the kept
    epoch's average) and clean (eval-mode) training accuracy, the kept epoch and the training minutes
    ("min"). Short names: the line stays under 250 characters."""
    return {
        "all_targets_hold": metrics["all_targets_hold"],
        **{name: {"val": round(m["val_acc"], 4), "test": round(m["test_acc"], 4),
                  "running": round(m["train_running_acc"], 4), "clean": round(m["train_acc"], 4),
                  "epoch": m["selected_epoch"], "min": round(m["train_time_s"] / 60, 1)}
           for name, m in metrics.items() if name in paths.MODEL_NAMES},
    }


def _metrics(rows: dict, targets: dict, device: torch.device, bf16: bool) -> dict:
    """metrics/evaluate.json: the figures people compare, per model, and whether each target holds."""
    metrics = {
        name: {
            **{k: r[k] for k in ("train_acc", "train_loss", "val_acc", "val_loss", "test_acc", "test_loss", "gap")},
            "train_running_acc": r["trained"]["train_running_acc"],
            "selected_epoch": r["trained"]["selected_epoch"],
            "parameters": r["trained"]["parameters"],
            "train_time_s": r["trained"]["train_time_s"],
        }
        for name, r in rows.items()
    }
    metrics["targets"] = {name: t["holds"] for name, t in targets.items()}
    metrics["all_targets_hold"] = all(t["holds"] for t in targets.values())
    # Where the figures were measured (the stages run on one machine; train times depend on it).
    metrics["machine"] = {"device": device_name(device), "cpu": cpu_model(),
                          "threads": torch.get_num_threads(),
                          "precision": "bf16" if bf16 else "fp32"}
    return metrics


def _write_outputs(config: Config, rows: dict, histories: dict, targets: dict, table: pd.DataFrame,
                   classes: list[str], test_labels, device: torch.device) -> None:
    """reports/ (the report, its figures, per-class accuracy) and plots/evaluate/ (the confusion matrices)."""
    per_class = pd.DataFrame({name: r["per_class_acc"] for name, r in rows.items()}, index=classes)
    per_class.index.name = "class"
    limits = config.evaluate.targets
    with replacing_dir(paths.REPORTS) as report_dir:
        plots.learning_curves(histories, limits.val_acc_min, limits.train_acc_max).savefig(
            report_dir / "learning_curves.png", dpi=110)
        plots.confusion_matrices({n: r["confusion"] for n, r in rows.items()}, classes).savefig(
            report_dir / "confusion_matrices.png", dpi=90)
        evaluate.write_report(report_dir / "report.md", table, targets, per_class, device_name(device))
        # Per-class detail stays out of the metrics file, which holds the figures people compare.
        per_class.to_csv(report_dir / "per_class_test_acc.csv")
    with replacing_dir(paths.PLOTS / "evaluate") as plot_dir:
        for name, r in rows.items():
            pd.DataFrame({"actual": [classes[i] for i in test_labels],
                          "predicted": [classes[i] for i in r["predicted"]]}).to_csv(
                plot_dir / f"confusion_{name}.csv", index=False)


def _record(config: Config, metrics: dict, tracked: dict, stats: dict, parent_run_id: str | None) -> str | None:
    """The evaluate run (each model's figures, the report), the registered ResNet and the parent's headline."""
    all_hold = metrics["all_targets_hold"]
    with tracking.stage_run(config, "evaluate", run_name="evaluate", parent_run_id=parent_run_id) as run:
        mlflow.set_tags({f"{name}.run_id": tracked[name]["run_id"] for name in paths.MODEL_NAMES})
        mlflow.set_tags({**tracking.data_tags(stats), "all_targets_hold": str(all_hold).lower()})
        mlflow.log_metrics({key: value for name in paths.MODEL_NAMES for key, value in tracking.model_metrics(
            name, {k: v for k, v in metrics[name].items() if k not in ("selected_epoch", "parameters")}).items()})
        mlflow.log_artifacts(str(paths.REPORTS), artifact_path="report")
        mlflow.log_dict(metrics, "evaluate.json")
        registered = _register(config, tracked["resnet"]["model_uri"], all_hold)
        parent = parent_run_id or run.data.tags.get("mlflow.parentRunId")
        if parent:
            tracking.summarize_parent(parent, metrics)
    return registered


def _register(config: Config, model_uri: str | None, all_hold: bool) -> str | None:
    """Register the ResNet; give it the champion alias only if every target holds."""
    if model_uri is None:
        return None  # train.log_model is off: nothing to register
    name = config.evaluate.registered_model
    version = mlflow.register_model(model_uri, name).version
    client = MlflowClient()
    client.set_model_version_tag(name, version, "all_targets_hold", str(all_hold).lower())
    if all_hold:
        client.set_registered_model_alias(name, CHAMPION, version)
        return f"registered {name} version {version} with alias @{CHAMPION}"
    return f"registered {name} version {version}, without @{CHAMPION}: not every target holds"
