"""The team set-up: a real PostgreSQL cluster and a real `mlflow server` (served artifacts) on 127.0.0.1.

The pipeline runs against the server as a teammate's machine would (MLFLOW_TRACKING_URI=http://...),
and the records are read back through the server. Then the two ways a shared server fails: down
when a stage starts (the stage refuses quickly, before training) and lost during training (the
stage finishes with complete DVC outputs, says what MLflow missed, and `log-run` records it later).

PostgreSQL refuses to run as root: as root, the cluster runs as the `postgres` user (Debian's
package creates it) or else `nobody`, in a temporary directory that user owns. Without PostgreSQL
binaries these tests are skipped, except in CI (CI set), where that is a failure: .ci/run installs them.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipeline import config, data, paths, tracking
from pipeline.stages import download, evaluate, normalize, train
from tests.conftest import ROOT, enter_project, tiny_params, write_params

EASY = ["evaluate.targets.val_acc_min=0.0", "evaluate.targets.train_acc_max=1.0"]
DB_USER = DB_NAME = "mlflow"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    """The directory of initdb/pg_ctl/createdb: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: .ci/run installs PostgreSQL, so this must not be skipped)")
    pytest.skip(reason)


class Postgres:
    """A throwaway cluster on 127.0.0.1: initdb + pg_ctl, fsync off, trust authentication."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.port = free_port()
        self.account = None
        if os.geteuid() == 0:  # postgres will not run as root
            name = "postgres" if _user_exists("postgres") else "nobody"
            self.account = pwd.getpwnam(name)
        self.dir = Path(tempfile.mkdtemp(prefix="mlflow-pg-", dir="/tmp" if self.account else None))
        if self.account:
            os.chown(self.dir, self.account.pw_uid, self.account.pw_gid)
        self.data = self.dir / "data"

    def _run(self, *args: str) -> None:
        kwargs = {}
        if self.account:
            kwargs = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        done = subprocess.run([str(self.bin / args[0]), *args[1:]], cwd=self.dir, capture_output=True, text=True,
                              timeout=120, **kwargs)
        assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale",
                  "--no-sync")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "postgres.log"), "-w", "-t", "60",
                  "-o", options, "start")
        # The README's commands for the team's database: a role and a database it owns.
        self._run("createuser", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", DB_USER)
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-O", DB_USER, DB_NAME)

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class MlflowServer:
    """`mlflow server` with a PostgreSQL backend store and served artifacts, in its own process group."""

    def __init__(self, backend: str, artifacts: Path, workdir: Path):
        self.backend, self.artifacts, self.workdir = backend, artifacts, workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 150) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers: nothing here uses them
        with open(self.workdir / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
                 "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1"],
                cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if opener.open(f"{self.uri}/health", timeout=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server did not answer /health within {timeout} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """As a crash or a lost machine would: the whole server at once, no goodbye."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if not self.alive():
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def log_tail(self) -> str:
        path = self.workdir / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@pytest.fixture(scope="module")
def postgres():
    bin_dir = postgres_bin()
    if bin_dir is None:
        unavailable("PostgreSQL binaries (initdb, pg_ctl) not found: install Debian's postgresql package")
    try:
        import psycopg  # noqa: F401  the driver MLflow needs: the `server` and `dev` extras
    except ImportError:
        unavailable("the PostgreSQL driver psycopg is not installed: pip install -e '.[dev]'")
    cluster = Postgres(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """A running `mlflow server` on the cluster; a test may kill it, but must leave it running."""
    workdir = tmp_path_factory.mktemp("mlflow-server")
    instance = MlflowServer(postgres.uri, workdir / "artifacts", workdir)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def shared(server, tmp_path_factory, archive_url, tiny_archive):
    """The tiny pipeline, in this process, recording to the server; yields the project directory."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        directory = enter_project(tmp_path_factory.mktemp("shared"), monkeypatch,
                                  tiny_params(archive_url, tiny_archive[1]))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        cfg = config.load()
        download.run(cfg)
        normalize.run(cfg)
        train.run(cfg, "baseline", progress=False)
        train.run(config.load(overrides=["train.log_model=true", "train.resnet.epochs=3"]), "resnet", progress=False)
        evaluate.run(config.load(overrides=["train.log_model=true", "train.resnet.epochs=3", *EASY]))
        yield directory


def tracked(directory: Path, name: str) -> dict:
    return json.loads((directory / paths.model_tracking_file(name)).read_text())


def test_runs_params_and_epoch_metrics_are_in_the_server(shared):
    client = MlflowClient()
    for name, epochs in (("baseline", 2), ("resnet", 3)):
        record = tracked(shared, name)
        assert record["complete"] is True
        run = client.get_run(record["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.params["epochs"] == str(epochs)
        assert run.data.tags["dvc.stage"] == f"train_{name}"
        history = pd.read_csv(shared / paths.history_file(name))
        for key in ("train_running_loss", "train_running_acc", "val_loss", "val_acc"):
            recorded = tracking.EPOCH_METRICS[key]
            points = sorted(client.get_metric_history(record["run_id"], recorded), key=lambda m: m.step)
            assert [m.step for m in points] == list(range(1, epochs + 1)), key
            np.testing.assert_allclose([m.value for m in points], history[key], rtol=1e-6)
        assert tracking.INCOMPLETE_TAG not in run.data.tags


def test_records_are_in_postgresql_and_artifacts_in_the_served_destination(shared, server, postgres):
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=postgres.port, user=DB_USER, dbname=DB_NAME) as connection:
        run_ids = {row[0] for row in connection.execute("select run_uuid from runs")}
    assert {tracked(shared, name)["run_id"] for name in paths.MODEL_NAMES} <= run_ids
    artifacts = {p.name for p in server.artifacts.rglob("*") if p.is_file()}
    assert {"history.csv", "learning_curves.png", "MLmodel"} <= artifacts
    assert not (shared / "mlruns").exists() and not (shared / "mlartifacts").exists(), \
        "the client wrote nothing locally: artifacts went through the server"


def test_logged_model_downloads_and_predicts_like_the_saved_weights(shared):
    import torch

    from pipeline import models

    cfg = config.load(overrides=["train.resnet.epochs=3"])
    model, _ = models.load(shared / paths.model_file("resnet"), cfg.train.resnet.model, "train_resnet")
    images = data.load_split(shared / paths.NORMALIZED, "test").images[:8].astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    pyfunc = mlflow.pyfunc.load_model(tracked(shared, "resnet")["model_uri"])
    np.testing.assert_allclose(np.asarray(pyfunc.predict(images)), expected, rtol=1e-4, atol=1e-4)


def test_registry_alias_champion_is_set_on_the_server(shared):
    client = MlflowClient()
    version = client.get_model_version_by_alias("cifar10-resnet", "champion")
    assert version.tags["all_targets_hold"] == "true"
    assert version.run_id == tracked(shared, "resnet")["run_id"]
    champion = mlflow.pyfunc.load_model("models:/cifar10-resnet@champion")
    images = data.load_split(shared / paths.NORMALIZED, "test").images[:4].astype(np.float32)
    assert np.asarray(champion.predict(images)).shape == (4, 10)


# --- a server that is down, or lost -----------------------------------------------------------


def pipeline_env(tracking_uri: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    return env


def test_server_down_at_start_stops_the_stage_quickly_before_training(project):
    cfg = config.load()
    download.run(cfg)
    normalize.run(cfg)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipeline", "train", "baseline", "--no-progress"], cwd=project,
                          env=pipeline_env(uri), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert "Traceback" not in done.stderr
    message = done.stderr
    assert f"the MLflow tracking store {uri}" in message and "is not reachable: connection refused" in message
    assert "start the tracking server" in message and "unset MLFLOW_TRACKING_URI" in message
    assert "nothing was trained" in message
    assert "epoch" not in done.stdout
    assert not (project / paths.model_file("baseline")).exists()
    assert not (project / paths.checkpoint_file("baseline")).exists()
    assert not (project / paths.metrics_file("baseline")).exists()


def test_server_lost_during_training_keeps_the_outputs_and_log_run_records_them(shared, server, tmp_path,
                                                                                 archive_url, tiny_archive):
    name, epochs, experiment = "resnet", 30, "lost-server"
    params = tiny_params(archive_url, tiny_archive[1])
    params["train"].update(experiment=experiment, log_model=True)
    # Wide enough that 30 epochs outlast killing the server after the first one.
    params["train"][name].update(model={"arch": "resnet", "width": 16, "blocks": [1, 1], "dropout": 0.1,
                                        "head_dropout": 0.1}, epochs=epochs, schedule_epochs=None)
    write_params(tmp_path, params)
    shutil.copytree(shared / paths.NORMALIZED, tmp_path / paths.NORMALIZED)
    env = pipeline_env(server.uri)
    client = MlflowClient(tracking_uri=server.uri)

    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "train", name, "--no-progress"], cwd=tmp_path,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        run_id = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            found = client.get_experiment_by_name(experiment)
            runs = client.search_runs([found.experiment_id], "tags.model = 'resnet'") if found else []
            if runs and client.get_metric_history(runs[0].info.run_id, "accuracy/val"):
                run_id = runs[0].info.run_id
                break
            time.sleep(0.2)
        assert run_id is not None, f"no epoch metric reached the server:\n{log_path.read_text()}"
        assert process.poll() is None, "training finished before the server could be killed: make it longer"
        server.kill()
        process.wait(timeout=180)
    finally:
        process.kill()
        if not server.alive():
            server.start()  # the same backend and port: the module's server, back up
    out = log_path.read_text()
    assert process.returncode == 0, out

    # The DVC outputs are complete, and the stage says what MLflow lacks and how to record it.
    assert len(pd.read_csv(tmp_path / paths.history_file(name))) == epochs
    assert (tmp_path / paths.model_file(name)).exists()
    assert json.loads((tmp_path / paths.metrics_file(name)).read_text())["epochs"] == epochs
    status = tracked(tmp_path, name)
    assert status["run_id"] == run_id and status["complete"] is False and status["model_uri"] is None
    assert any(item.startswith("metrics of epochs ") for item in status["not_logged"]), status
    assert "the model" in status["not_logged"]
    assert f"WARNING: train_{name} finished, but the MLflow tracking store {server.uri} did not record" in out
    assert "This stage exits 0 on purpose" in out
    assert f"    python -m pipeline log-run {name}" in out
    logged = {m.step for m in client.get_metric_history(run_id, "accuracy/val")}
    assert logged and max(logged) < epochs, "some epochs reached the server before it was lost, not all"

    # With the server back, `log-run` records the finished stage as a new run.
    done = subprocess.run([sys.executable, "-m", "pipeline", "log-run", name], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"dvc commit -f train_{name}" in done.stdout
    relogged = tracked(tmp_path, name)
    assert relogged["complete"] is True and relogged["relogged_from"] == run_id
    new = client.get_run(relogged["run_id"])
    assert new.info.run_id != run_id and new.info.status == "FINISHED"
    assert new.data.params["epochs"] == str(epochs)
    assert new.data.tags[tracking.RELOGGED_FROM_TAG] == run_id
    history = pd.read_csv(tmp_path / paths.history_file(name))
    for key in ("train_running_acc", "val_acc", "val_loss", "lr"):
        recorded = tracking.EPOCH_METRICS[key]  # MLflow's name of the history.csv column
        points = sorted(client.get_metric_history(new.info.run_id, recorded), key=lambda m: m.step)
        assert [m.step for m in points] == list(range(1, epochs + 1)), key
        np.testing.assert_allclose([m.value for m in points], history[key], rtol=1e-6)
    summary = json.loads((tmp_path / paths.metrics_file(name)).read_text())
    assert new.data.metrics["selected/val_acc"] == pytest.approx(summary["val_acc"])
    images = data.load_split(tmp_path / paths.NORMALIZED, "val").images[:4].astype(np.float32)
    assert np.asarray(mlflow.pyfunc.load_model(relogged["model_uri"]).predict(images)).shape == (4, 10)
    old = client.get_run(run_id)
    assert old.info.status == "FAILED" and old.data.tags[tracking.RELOGGED_AS_TAG] == new.info.run_id
