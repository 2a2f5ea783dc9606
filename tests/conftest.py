"""Shared fixtures: a tiny CIFAR-10 archive in the official layout, served over real HTTP on 127.0.0.1,
and params for models small enough to train in seconds on a CPU."""

from __future__ import annotations

import os

# `make test` runs modules in parallel worker processes (pytest-xdist), one per core; the models are tiny.
# One thread per worker, and per subprocess it starts, keeps the workers from oversubscribing the cores.
# Set before numpy and torch are imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import functools
import gzip
import hashlib
import http.server
import io
import pickle
import shutil
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Git needs an identity for the commits that DVC tests make; CI machines may have none.
os.environ.setdefault("GIT_AUTHOR_NAME", "tests")
os.environ.setdefault("GIT_AUTHOR_EMAIL", "tests@localhost")
os.environ.setdefault("GIT_COMMITTER_NAME", "tests")
os.environ.setdefault("GIT_COMMITTER_EMAIL", "tests@localhost")


@pytest.fixture(autouse=True)
def _no_mlflow_experiment_env():
    """mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID for subprocesses; an in-process test's
    experiment id must not reach the next test's subprocesses, which use another store."""
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    yield
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Learnable images: each class has its own mean colour and stripe direction, plus noise.

    Returned as the official rows: uint8, N x 3072, channel-major (R plane, G plane, B plane).
    """
    n = len(labels)
    colours = np.linspace(40, 215, 10)
    images = np.empty((n, 3, 32, 32), dtype=np.float64)
    yy, xx = np.mgrid[0:32, 0:32]
    for i, label in enumerate(labels):
        stripes = np.sin((xx if label % 2 else yy) * (1 + label % 5) * 0.5) * 40
        for c in range(3):
            images[i, c] = colours[(label + 3 * c) % 10] + stripes
    images += rng.normal(0, 20, images.shape)
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, -1)


def build_archive(out_dir: Path, train_per_class: int = 20, test_per_class: int = 10, seed: int = 0) -> tuple[Path, str]:
    """A CIFAR-10 "python version" archive: cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    y_train = rng.permutation(np.repeat(np.arange(10), train_per_class))
    y_test = np.repeat(np.arange(10), test_per_class)
    x_train, x_test = make_images(y_train, rng), make_images(y_test, rng)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "cifar-10-python.tar.gz"

    def add(tar: tarfile.TarFile, name: str, obj: dict) -> None:
        payload = pickle.dumps(obj, protocol=2)
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size, info.mtime = len(payload), 0
        tar.addfile(info, io.BytesIO(payload))

    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w") as tar:
        add(tar, "batches.meta", {"label_names": CLASSES, "num_cases_per_batch": len(y_train) // 5})
        for b, idx in enumerate(np.array_split(np.arange(len(y_train)), 5), start=1):
            add(tar, f"data_batch_{b}", {"data": x_train[idx], "labels": y_train[idx].tolist()})
        add(tar, "test_batch", {"data": x_test, "labels": y_test.tolist()})
    return path, hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> tuple[Path, str]:
    """(path, md5) of a 200-train / 100-test image archive."""
    return build_archive(tmp_path_factory.mktemp("archive"))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="session")
def http_server(tiny_archive):
    """A real HTTP server on 127.0.0.1 serving the tiny archive's folder; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(tiny_archive[0].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def archive_url(http_server, tiny_archive) -> str:
    return f"{http_server}/{tiny_archive[0].name}"


def tiny_params(url: str, md5: str, **sections) -> dict:
    """params.yaml for CPU tests: the project's own params with tiny models and two epochs."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(url=url, md5=md5, val_size=50)
    params["train"].update(eval_train_size=0, eval_batch_size=256, log_model=False, device="cpu")
    params["train"]["baseline"].update(
        model={"arch": "baseline", "widths": [4, 8], "hidden": 16}, epochs=2, batch_size=32)
    params["train"]["resnet"].update(
        model={"arch": "resnet", "width": 4, "blocks": [1, 1], "dropout": 0.1, "head_dropout": 0.1},
        epochs=2, batch_size=32, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
                                            "weight_decay": 5e-4})
    for section, values in sections.items():
        params[section].update(values)
    return params


def write_params(directory: Path, params: dict) -> Path:
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def enter_project(directory: Path, monkeypatch: pytest.MonkeyPatch, params: dict) -> Path:
    """Make directory the working directory, with these params and its own MLflow sqlite store."""
    write_params(directory, params)
    monkeypatch.chdir(directory)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{directory / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return directory


@pytest.fixture
def project(tmp_path, monkeypatch, archive_url, tiny_archive):
    """A working directory with tiny params and its own MLflow sqlite store; yields the directory."""
    return enter_project(tmp_path, monkeypatch, tiny_params(archive_url, tiny_archive[1]))


@dataclass
class BuiltProject:
    path: Path  # a committed git + DVC repository after one `dvc repro`; tests work on copies
    repro_output: str  # what that `dvc repro` printed


@pytest.fixture(scope="session")
def built_project(tmp_path_factory, archive_url, tiny_archive) -> BuiltProject:
    """The project's dvc.yaml, pipeline/ and .dvc/config (its default remote) with tiny params, committed,
    after one `dvc repro` and committed again: built once per session (under pytest-xdist, once per worker
    that needs it), copied by each DVC test module with copy_project. Models are logged to MLflow and the
    targets are reachable, so a champion exists."""
    repo = tmp_path_factory.mktemp("built") / "project"
    repo.mkdir()
    shutil.copytree(ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", "data/.gitignore"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    params = tiny_params(archive_url, tiny_archive[1])
    params["train"]["log_model"] = True
    params["evaluate"]["targets"].update(val_acc_min=0.0, train_acc_max=1.0)
    write_params(repo, params)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        return done.stdout

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")  # the committed default remote
    shutil.copytree(ROOT / ".dvc/plots", repo / ".dvc/plots")  # the project's plot templates
    run("git", "add", "-A")
    run("git", "commit", "-qm", "tiny project")
    output = run("dvc", "repro")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "tiny repro")
    return BuiltProject(repo, output)


def copy_project(built: BuiltProject, directory: Path) -> Path:
    """A copy of the built project at directory/project: git history, DVC cache and MLflow store included.
    The store records its artifact folder by absolute path, so runs logged in a copy put their artifacts
    in the built project's mlruns/ (each under its own run id); its git and DVC state stay untouched."""
    return Path(shutil.copytree(built.path, directory / "project", symlinks=True))
