"""pipeline/__main__.py and the check stage: preflight before side effects, and one training of a model at a time."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
import pytest
import yaml
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


def test_sigterm_stops_a_training_like_ctrl_c_and_marks_its_mlflow_run_failed(tmp_path, archive_url, tiny_archive):
    # `mlflow run` answers Ctrl-C by terminating its command: the run must not stay RUNNING in MLflow.
    params = tiny_params(archive_url, tiny_archive[1])
    params["train"]["resnet"].update(model={"arch": "resnet", "width": 16, "blocks": [1, 1]}, epochs=30,
                                     schedule_epochs=None)
    write_params(tmp_path, params)
    for stage in ("download", "normalize"):
        assert run_cli(stage, cwd=tmp_path).returncode == 0
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": store}
    env.pop("MLFLOW_RUN_ID", None)
    training = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "resnet", "--no-progress"], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / paths.checkpoint_file("resnet")
    deadline = time.monotonic() + 240
    while not checkpoint.exists():
        assert training.poll() is None, "training ended before it could be stopped: " + training.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    training.send_signal(signal.SIGTERM)
    _, err = training.communicate(timeout=120)
    assert training.returncode == 130, err
    assert "interrupted: the last finished epoch is checkpointed; rerun the same command to resume" in err
    client = MlflowClient(store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`dvc.stage` = 'train_resnet'")
    assert run.info.status == "FAILED"


def test_repro_refuses_what_dvc_cannot_read(tmp_path, archive_url, tiny_archive):
    write_params(tmp_path, tiny_params(archive_url, tiny_archive[1]))
    (tmp_path / "overlay.yaml").write_text("train:\n  resnet:\n    epochs: 1\n")
    result = run_cli("repro", "--overlay", "overlay.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "repro runs DVC, which reads params.yaml only: give changes as -S key=value" in result.stderr


def test_ui_serves_the_project_store_and_links_to_its_training_runs(tmp_path, archive_url, tiny_archive):
    write_params(tmp_path, tiny_params(archive_url, tiny_archive[1]))
    experiment = yaml.safe_load((tmp_path / "params.yaml").read_text())["train"]["experiment"]
    experiment_id = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment(experiment)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    ui = subprocess.Popen([sys.executable, "-m", "pipeline", "ui", "--port", str(port)], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        link = ui.stdout.readline().strip()
        assert link == (f"MLflow: http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs"
                        "?workflowType=machine_learning")
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get"
                                            f"?experiment_id={experiment_id}", timeout=5) as reply:
                    assert yaml.safe_load(reply.read())["experiment"]["name"] == experiment, "the project's store"
                break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, "mlflow ui did not come up"
                time.sleep(1)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


@pytest.mark.skipif(torch.cuda.is_available() or len(os.sched_getaffinity(0)) >= 64, reason="needs fewer devices")
@pytest.mark.parametrize("overrides, phrase", [
    (["train.nproc=64", "train.baseline.batch_size=64", "train.resnet.batch_size=64"],
     f"train.nproc=64, but this machine has {len(os.sched_getaffinity(0))} CPU cores"),
    (["train.resnet.batch_size=100000"], "train.resnet.batch_size 100,000 is larger than the training split"),
    (["train.resnet.model.width=100000"], "parameters: about .* GiB for weights"),
])
@pytest.mark.parametrize("stage", [["check"], ["train", "resnet"]])
def test_impossible_settings_stop_before_any_process_or_output(tmp_path, archive_url, tiny_archive, overrides,
                                                                phrase, stage):
    write_params(tmp_path, tiny_params(archive_url, tiny_archive[1]))
    started = time.monotonic()
    done = run_cli(*stage, *[f"--set={o}" for o in overrides], cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert re.search(phrase, done.stderr) and "Traceback" not in done.stderr
    assert time.monotonic() - started < 60, "refused at once, not after starting processes"
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()
