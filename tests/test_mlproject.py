"""`mlflow run .` with the project's MLproject and overrides, against a temporary tracking store."""

from __future__ import annotations

import os
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
    for name in ("MLproject", "python_env.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    write_params(tmp_path, tiny_params(archive_url, tiny_archive[1]))
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


def test_main_entry_point_runs_the_pipeline_with_an_override(mlproject):
    done = mlflow_run(mlproject, "-P", "epochs=1", "-P", "lr=0.02")
    assert done.returncode == 0, done.stderr
    recorded = runs(mlproject)
    parent = next(r for r in recorded if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["epochs"] == "1" and parent.data.params["lr"] == "0.02"
    children = {r.data.tags["dvc.stage"]: r for r in recorded if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"train_baseline", "train_resnet", "evaluate"}
    assert children["train_resnet"].data.params["resnet.epochs"] == "1"
    assert children["train_baseline"].data.params["baseline.optimizer.lr"] == "0.02"
    assert (mlproject / "reports/report.md").exists()


def test_train_entry_point_records_one_run_with_the_override(mlproject):
    for stage in ("download", "normalize"):
        subprocess.run([sys.executable, "-m", "pipeline", stage], cwd=mlproject, check=True, capture_output=True)
    done = mlflow_run(mlproject, "-e", "train", "-P", "model=baseline", "-P", "epochs=1", "-P", "batch_size=16")
    assert done.returncode == 0, done.stderr
    (run,) = [r for r in runs(mlproject) if "pipeline.parent" not in r.data.tags]
    assert run.data.params["epochs"] == "1"  # as given to mlflow run
    assert run.data.params["baseline.epochs"] == "1"  # as the pipeline applied it
    assert run.data.params["baseline.batch_size"] == "16"
    assert run.data.tags["dvc.stage"] == "train_baseline"


def test_a_wrong_parameter_value_gives_the_config_error(mlproject):
    done = mlflow_run(mlproject, "-e", "train", "-P", "epochs=31")
    assert done.returncode != 0
    assert "train.resnet.epochs: Input should be less than or equal to 30" in done.stderr
