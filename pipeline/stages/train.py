"""Stages train_baseline and train_resnet: data/normalized/ -> models/<name>/, metrics/<name>.json,
plots/<name>/history.csv, and one MLflow run with params, per-epoch metrics, datasets and the model."""

from __future__ import annotations

import json

import mlflow
import pandas as pd

from pipeline import data, distributed, models, paths, plots, tracking
from pipeline.compute import training_flops, training_images_per_s
from pipeline.config import Config, Recipe, TrainSection
from pipeline.device import device_name, select_device, uses_bf16
from pipeline.train import Checkpoint, FitResult, fit


def write_outputs(name: str, train_cfg: Recipe, result: FitResult, key: str) -> dict:
    """models/<name>/model.pt, metrics/<name>.json (the kept epoch's figures; returned) and history.csv."""
    history = pd.DataFrame(result.history)
    chosen = history.loc[history["epoch"] == result.selected_epoch].iloc[0]
    summary = {
        "selected_epoch": int(result.selected_epoch),
        "epochs": int(train_cfg.epochs),
        "select": train_cfg.select,
        "train_running_acc": float(chosen["train_running_acc"]),
        "train_clean_subset_acc": float(chosen["train_clean_subset_acc"]),
        "val_acc": float(chosen["val_acc"]),
        "val_loss": float(chosen["val_loss"]),
        "train_running_loss": float(chosen["train_running_loss"]),
        "train_time_s": float(history["epoch_time_s"].sum()),
        "images_per_s": float(history["images_per_s"].median()),
        "parameters": models.count_parameters(result.model),
    }
    # Each file replaced whole, after training: a stage killed before this point keeps the previous outputs.
    with paths.replacing(paths.model_file(name)) as tmp:
        models.save(tmp, train_cfg.model, result.state, fingerprint=key, selected_epoch=result.selected_epoch)
    with paths.replacing(paths.metrics_file(name)) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    with paths.replacing(paths.history_file(name)) as tmp:
        history.to_csv(tmp, index=False)
    return summary


def plan(name: str, recipe: Recipe, settings: TrainSection, train_images: int, val_images: int,
         epochs_done: int = 0) -> str:
    """The stage's first line: what it trains, its compute, and about how long it takes on this machine."""
    device = select_device(settings.device)
    bf16 = uses_bf16(settings.precision, device)
    speed = training_images_per_s(recipe, device, bf16) * distributed.context().world_size
    # Each epoch also scores the clean subset and validation: a forward pass costs about a third of a step.
    scored = (settings.eval_train_size or train_images) + val_images
    minutes = (recipe.epochs - epochs_done) * (train_images + scored / 3) / speed / 60
    left = f" ({epochs_done} done: {recipe.epochs - epochs_done} to go)" if epochs_done else ""
    return (f"train_{name}: {recipe.epochs} epochs{left} of {train_images:,} images at batch {recipe.batch_size} on "
            f"{device_name(device)} ({'bf16' if bf16 else 'fp32'}), {training_flops(recipe, train_images):.2e} "
            f"training FLOPs: about {minutes:.0f} min here ({speed:.0f} img/s measured just now)")


def run(config: Config, name: str, parent_run_id: str | None = None, progress: bool = True) -> dict:
    train_cfg = getattr(config.train, name)
    train = data.load_split(paths.NORMALIZED, "train")
    val = data.load_split(paths.NORMALIZED, "val")
    stats = data.load_stats(paths.NORMALIZED)
    key = config.model_fingerprint(name)
    checkpoint = Checkpoint(paths.checkpoint_file(name), key)
    resume = checkpoint.load()
    if not distributed.context().is_main:
        # Another rank of a torchrun job: it trains its share; rank 0 writes the outputs and MLflow records.
        fit(train_cfg, config.train, train, val, checkpoint, resume=resume, progress=False)
        return {}
    tracking.require_tracking(f"train_{name}")  # a tracking server that is down stops the stage before training
    print(plan(name, train_cfg, config.train, len(train.labels), len(val.labels), resume["epoch"] if resume else 0),
          flush=True)

    # Once the run is open, MLflow failures are recorded in `log` instead of failing the stage.
    log = tracking.StageLog(name)
    # GPU runs record MLflow's system metrics (GPU use and memory), to see whether the GPU was kept busy.
    on_gpu = select_device(config.train.device).type == "cuda"
    with tracking.stage_run(config, f"train_{name}", run_name=name, parent_run_id=parent_run_id,
                            resume_run_id=resume["run_id"] if resume else None, log=log,
                            system_metrics=on_gpu) as run:
        tracking.record_inputs(config, name, {"train": train, "val": val}, stats, do=log.do,
                               resumed=resume is not None)

        checkpoint.run_id = run.info.run_id
        result = fit(train_cfg, config.train, train, val, checkpoint, on_epoch=log.epoch, resume=resume,
                     progress=progress)
        log.do("the device tags", mlflow.set_tags, {"device": tracking.environment_tags(result.device)["device"],
                                                    "precision": result.precision})
        # The DVC outputs come first: a tracking failure after this point loses no trained model.
        summary = write_outputs(name, train_cfg, result, key)
        # Recorded from the files just written, as log-run records them.
        curves = plots.learning_curves({name: pd.read_csv(paths.history_file(name))})
        model = models.load_trained(config, name)[0] if config.train.log_model else None
        model_uri = tracking.record_outputs(config, name, curves, model, val.images[:4].astype("float32"), do=log.do)
    # After the run's end, so that `complete` covers every record, the end included.
    with paths.replacing(paths.model_tracking_file(name)) as tmp:
        tmp.write_text(json.dumps({"run_id": run.info.run_id, "model_uri": model_uri,
                                   "experiment": config.train.experiment, **log.status()}, indent=2) + "\n")
    log.report([str(paths.model_file(name)), str(paths.metrics_file(name)), str(paths.history_file(name))])
    print(f"{name}: epoch {summary['selected_epoch']} selected ({train_cfg.select}); running train acc "
          f"{summary['train_running_acc']:.4f} (clean {summary['train_clean_subset_acc']:.4f}), "
          f"val acc {summary['val_acc']:.4f}")
    return summary
