"""pipeline/__main__.py and the check stage: preflight before side effects, and one training of a model at a time."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import torch
import pytest
from mlflow.tracking import MlflowClient

from pipeline import paths
from pipeline.stages import check
from tests.conftest import ROOT, tiny_params, write_params


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_check_writes_the_same_bytes_whenever_it_passes(tmp_path, archive_url, tiny_archive):
    write_params(tmp_path, tiny_params(archive_url, tiny_archive[1]))
    first = run_cli("check", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    written = (tmp_path / paths.PARAMS_CHECK).read_bytes()
    assert written == check.PASSED.encode()
    other = run_cli("check", "-S", "train.resnet.epochs=3", cwd=tmp_path)
    assert other.returncode == 0 and (tmp_path / paths.PARAMS_CHECK).read_bytes() == written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("stage", [["check"], ["train", "resnet"], ["all"]])
def test_a_device_the_machine_lacks_stops_before_any_run_or_output(tmp_path, archive_url, tiny_archive, stage):
    write_params(tmp_path, tiny_params(archive_url, tiny_archive[1]))
    done = run_cli(*stage, "-S", "train.device=cuda", cwd=tmp_path)
    assert done.returncode == 2 and "no CUDA GPU is visible" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()
    if (tmp_path / "mlflow.db").exists():  # a store may exist; it holds no run
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_second_training_of_the_same_model_refuses_while_one_runs(tmp_path, archive_url, tiny_archive):
    write_params(tmp_path, tiny_params(archive_url, tiny_archive[1]))
    lock = tmp_path / paths.CHECKPOINTS / "resnet.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:  # what a running `train resnet` holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = run_cli("train", "resnet", cwd=tmp_path)
    assert done.returncode == 2
    assert "another training of the resnet model is running" in done.stderr
    assert not (tmp_path / "models").exists()


def test_all_stopped_by_bad_data_leaves_no_mlflow_run(tmp_path, archive_url):
    write_params(tmp_path, tiny_params(archive_url, "0" * 32))  # the archive does not have this md5
    done = run_cli("all", cwd=tmp_path)
    assert done.returncode == 2 and "md5 mismatch" in done.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
