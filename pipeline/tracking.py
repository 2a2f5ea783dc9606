"""MLflow records: one run per stage, grouped under a parent run per pipeline configuration.

Tracking goes to MLFLOW_TRACKING_URI when set, else to MLflow's local default
(sqlite:///mlflow.db in the working directory, the project root under DVC).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import warnings
from contextlib import contextmanager
from typing import Iterator

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from pipeline.config import Config, flatten
from pipeline.data import Split
from pipeline.train import device_name

GROUP_TAG = "pipeline.group"
PARENT_TAG = "pipeline.parent"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_tags() -> dict[str, str]:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
    }


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


def parent_run(config: Config) -> str:
    """The parent run of this configuration's group in the params' experiment, found or created."""
    client = MlflowClient()
    experiment_id = mlflow.set_experiment(config.train.experiment).experiment_id
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


@contextmanager
def stage_run(config: Config, stage: str, run_name: str, resume_run_id: str | None = None,
              parent_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of one stage.

    Inside `mlflow run` (MLFLOW_RUN_ID set) that run is the stage's run. A resumed training
    stage continues its own run. Otherwise a new run is nested under the parent run of this
    configuration's group (`parent_run_id`, or one found or created by the group tag).
    """
    tags = {GROUP_TAG: group_id(config), "dvc.stage": stage, **git_tags(), **environment_tags()}
    if resume_run_id is None and os.environ.get("MLFLOW_RUN_ID"):
        resume_run_id = os.environ["MLFLOW_RUN_ID"]
    if resume_run_id is not None:
        run = mlflow.start_run(run_id=resume_run_id)
    else:
        parent = parent_run_id or parent_run(config)
        # Children live in their parent's experiment (under `mlflow run`, the one it was given).
        experiment_id = MlflowClient().get_run(parent).info.experiment_id
        run = mlflow.start_run(run_name=run_name, parent_run_id=parent, experiment_id=experiment_id, tags=tags)
    with run:
        mlflow.set_tags(tags)
        yield run


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
