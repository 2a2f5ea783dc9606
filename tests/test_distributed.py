"""Data-parallel training under torchrun: 2 CPU processes with gloo against one process, on tiny data."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from pipeline import config
from pipeline.stages import download, normalize
from tests.conftest import enter_project, tiny_params

# One global batch splits into equal halves and 150 training images into 5 full batches, so the
# averaged gradients of two processes equal the one-process gradient up to float rounding.
BATCH = ["train.baseline.batch_size=30", "train.resnet.batch_size=30", "train.baseline.epochs=3"]
LOSS_TOLERANCE = 1e-4  # relative, per epoch: float summation order is all that differs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, archive_url, tiny_archive) -> Path:
    """A project directory with the normalized tiny data, copied by each test."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        base = tmp_path_factory.mktemp("ddp")
        enter_project(base, monkeypatch, tiny_params(archive_url, tiny_archive[1]))
        cfg = config.load()
        download.run(cfg)
        normalize.run(cfg)
    return base


def train(prepared: Path, tmp_path: Path, name: str, model: str, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    directory = tmp_path / name
    shutil.copytree(prepared, directory)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{directory / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    args = [sys.executable, "-m", "pipeline", "train", model, "--no-progress"]
    for override in (*BATCH, *overrides):
        args += ["-S", override]
    done = subprocess.run(args, cwd=directory, env=env, capture_output=True, text=True, timeout=300)
    return done, directory


def stage_runs(directory: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{directory / 'mlflow.db'}")
    try:
        runs = mlflow.search_runs(experiment_names=["cifar10-resnet-vs-cnn"], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    return [r for r in runs if "dvc.stage" in r.data.tags]


def test_two_processes_match_one_process_loss_history(prepared, tmp_path):
    single, single_dir = train(prepared, tmp_path, "single", "baseline")
    assert single.returncode == 0, single.stderr
    double, double_dir = train(prepared, tmp_path, "double", "baseline", "train.nproc=2")
    assert double.returncode == 0, double.stderr
    assert "torch.distributed.run" in double.stdout and "--nproc-per-node=2" in double.stdout

    one = pd.read_csv(single_dir / "plots/baseline/history.csv")
    two = pd.read_csv(double_dir / "plots/baseline/history.csv")
    assert len(one) == len(two) == 3
    for key in ("train_running_loss", "val_loss"):
        relative = ((one[key] - two[key]).abs() / one[key]).max()
        assert relative < LOSS_TOLERANCE, (key, relative)
    assert (one["train_running_acc"] - two["train_running_acc"]).abs().max() < 0.01  # counted over the global batch


def test_only_rank_zero_records_one_mlflow_run_and_the_outputs(prepared, tmp_path):
    done, directory = train(prepared, tmp_path, "resnet", "resnet", "train.nproc=2")
    assert done.returncode == 0, done.stderr
    runs = stage_runs(directory)
    assert [r.data.tags["dvc.stage"] for r in runs] == ["train_resnet"]
    history = mlflow.tracking.MlflowClient(f"sqlite:///{directory / 'mlflow.db'}").get_metric_history(
        runs[0].info.run_id, "loss/train_running")
    assert sorted(m.step for m in history) == [1, 2], "one point per epoch, not one per rank"
    assert runs[0].data.params["train.nproc"] == "2"
    for path in ("models/resnet/model.pt", "metrics/resnet.json", "plots/resnet/history.csv"):
        assert (directory / path).exists(), path


def processes_with(marker: str) -> list[int]:
    """The pids of live processes whose environment holds `marker` (a launcher, torchrun, its ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes() and \
                        not (entry / "stat").read_text().split(")")[-1].split()[0] == "Z":
                    found.append(int(entry.name))
            except OSError:
                pass  # gone meanwhile, or not ours
    return found


def lock_is_free(path: Path) -> bool:
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_killing_the_launcher_ends_its_ranks_and_the_lock_lasts_as_long_as_they_do(prepared, tmp_path):
    directory = tmp_path / "killed"
    shutil.copytree(prepared, directory)
    marker = f"PIPELINE_TEST_RUN={uuid.uuid4().hex}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{directory / 'mlflow.db'}",
           marker.split("=")[0]: marker.split("=")[1]}
    env.pop("MLFLOW_RUN_ID", None)
    args = [sys.executable, "-m", "pipeline", "train", "resnet", "--no-progress"]
    for override in (*BATCH, "train.nproc=2", "train.resnet.epochs=30", "train.resnet.schedule_epochs=null"):
        args += ["-S", override]
    launcher = subprocess.Popen(args, cwd=directory, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = directory / "checkpoints/resnet.pt"
    lock = directory / "checkpoints/resnet.lock"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists() and launcher.poll() is None, "premise: the ranks are training"
    assert len(processes_with(marker)) >= 4, "premise: the launcher, torchrun and two ranks"
    launcher.kill()  # -9: no cleanup of its own
    launcher.wait()
    deadline = time.monotonic() + 60
    while processes_with(marker) and time.monotonic() < deadline:
        assert not lock_is_free(lock), "the lock was free while a rank still trained"
        time.sleep(0.05)
    assert processes_with(marker) == [], "ranks outlived their launcher"
    # A process's memory (and so its environment) goes a moment before its files do, in the kernel's exit.
    deadline = time.monotonic() + 10
    while not lock_is_free(lock) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock_is_free(lock), "nothing holds the lock once every process is gone"
