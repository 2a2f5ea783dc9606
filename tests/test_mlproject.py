"""`mlflow run .` with the project's MLproject and overrides, against a temporary tracking store."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.conftest import ROOT, tiny_params, write_params

BIN = Path(sys.executable).parent


@pytest.fixture
def mlproject(tmp_path, archive_url, tiny_archive) -> Path:
    """The project's MLproject and DVC pipeline with tiny params, in a git repository (the main entry point
    drives `dvc exp run`, which needs one)."""
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("MLproject", "python_env.yaml", "dvc.yaml", ".gitignore", "data/.gitignore"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    write_params(tmp_path, tiny_params(archive_url, tiny_archive[1]))
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"],
                    [str(BIN / "dvc"), "config", "core.analytics", "false"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny project"]):
        subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    return tmp_path


def mlflow_run(directory: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{directory / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run([str(BIN / "mlflow"), "run", ".", "--env-manager", "local", *args], cwd=directory,
                          env=env, capture_output=True, text=True, timeout=600)


def runs(directory: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{directory / 'mlflow.db'}")
    try:
        return mlflow.search_runs(search_all_experiments=True, output_format="list")
    finally:
        mlflow.set_tracking_uri(None)


def test_main_entry_point_runs_the_dvc_pipeline_with_overrides_under_its_run(mlproject):
    # -S syntax, space-separated; a value with spaces is quoted.
    overrides = "train.resnet.epochs=1 train.baseline.optimizer.lr=0.02 'train.resnet.model.blocks=[1, 1]'"
    done = mlflow_run(mlproject, "-P", f"set={overrides}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Running stage 'train_resnet'" in done.stdout, "DVC ran the stages"
    recorded = runs(mlproject)
    parent = next(r for r in recorded if "mlflow.parentRunId" not in r.data.tags)
    assert shlex.split(parent.data.params["set"]) == [overrides]  # MLflow records the value shell-quoted
    children = {r.data.tags["dvc.stage"]: r for r in recorded if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"train_baseline", "train_resnet", "evaluate"}
    assert children["train_resnet"].data.params["epochs"] == "1"
    assert children["train_resnet"].data.params["model.blocks"] == "[1, 1]"
    assert children["train_baseline"].data.params["optimizer.lr"] == "0.02"
    assert "resnet/val_acc" in parent.data.metrics, "the headline lands on mlflow run's run"
    assert (mlproject / "reports/report.md").exists()

    # The same run again: DVC has every stage in its cache, so nothing trains twice.
    again = mlflow_run(mlproject, "-P", f"set={overrides}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Running stage" not in again.stdout, again.stdout
    second = next(r for r in runs(mlproject) if "mlflow.parentRunId" not in r.data.tags
                  and r.info.run_id != parent.info.run_id and "pipeline.parent" not in r.data.tags)
    assert second.data.metrics["resnet/val_acc"] == parent.data.metrics["resnet/val_acc"], "the headline, from cache"


def test_train_entry_point_runs_one_training_stage_through_dvc_under_its_run(mlproject):
    done = mlflow_run(mlproject, "-e", "train", "-P", "model=baseline",
                      "-P", "set=train.baseline.epochs=1 train.baseline.batch_size=16")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Running stage 'train_baseline'" in done.stdout, "DVC ran the stage, and the data stages before it"
    assert "Running stage 'train_resnet'" not in done.stdout and "Running stage 'evaluate'" not in done.stdout
    recorded = runs(mlproject)
    parent = next(r for r in recorded if "mlflow.parentRunId" not in r.data.tags)
    assert shlex.split(parent.data.params["set"]) == ["train.baseline.epochs=1 train.baseline.batch_size=16"]  # given
    (run,) = [r for r in recorded if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert run.data.params["epochs"] == "1" and run.data.params["batch_size"] == "16"  # as the pipeline applied it
    assert run.data.tags["dvc.stage"] == "train_baseline"
    assert "batch_size: 16" in (mlproject / "params.yaml").read_text(), "DVC applied the experiment to the workspace"


def test_a_wrong_parameter_value_gives_the_config_error(mlproject):
    done = mlflow_run(mlproject, "-e", "train", "-P", "set=train.resnet.epochs=31")
    assert done.returncode != 0
    assert "train.resnet.epochs: Input should be less than or equal to 30" in done.stderr
