"""Shared data and models: the committed DVC remote, `dvc push` / `dvc pull` into a fresh clone, and a
parameter sweep through DVC's experiment queue, all with real DVC on a tiny archive served over HTTP from
127.0.0.1.

The module works on a copy of the tiny project that conftest built and reproduced once. It has the
project's own .dvc/config, so its relative remote url (`../../cifar10-dvc-storage`, relative to .dvc/)
lands beside the temporary checkout, exactly as it lands beside /path/to/checkout for a real one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, copy_project

BIN = Path(sys.executable).parent
STAGES = ["download", "normalize", "train_baseline", "train_resnet", "evaluate"]
STORAGE = "cifar10-dvc-storage"  # the committed remote's folder, beside the checkout
PULLED = ["data/raw/cifar-10-python.tar.gz", "data/raw/cifar-10-batches-py/test_batch",
          "data/normalized/stats.json", "data/normalized/train_images.npy", "models/baseline/model.pt",
          "models/resnet/model.pt", "reports/report.md"]
SWEEP = [1, 2]  # train.resnet.seed of the queued experiments
QUEUE_TIMEOUT_S = 300


def sh(repo: Path, *args: str, check: bool = True, timeout: float = 300,
       tracking_uri: bool = True) -> subprocess.CompletedProcess:
    """Run a command in repo with the venv's dvc first on PATH and repo's own MLflow sqlite store
    (named by MLFLOW_TRACKING_URI, or with tracking_uri=False left to the pipeline's default)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    if not tracking_uri:
        env.pop("MLFLOW_TRACKING_URI")
    # Output through files, not pipes: `dvc queue start` leaves a worker daemon holding its stdout and stderr.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(args, cwd=repo, env=env, stdout=out, stderr=err, timeout=timeout).returncode
        out.seek(0), err.seek(0)
        done = subprocess.CompletedProcess(args, code, out.read(), err.read())
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def ran_stages(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def remotes(repo: Path) -> dict[str, str]:
    """`dvc remote list`: name -> url as DVC resolves it (a relative local url becomes absolute)."""
    words = [w for w in sh(repo, "dvc", "remote", "list", timeout=60).stdout.split() if w != "(default)"]
    return dict(zip(words[::2], words[1::2]))  # the table wraps at the terminal width: read it as words


def digest(path: Path) -> str:
    import hashlib
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, built_project) -> Path:
    """A copy of the built project (conftest: one tiny `dvc repro`, committed), pushed to the default remote."""
    repo = copy_project(built_project, tmp_path_factory.mktemp("dvc_remote"))
    sh(repo, "dvc", "push")
    return repo


@pytest.fixture(scope="module")
def clone(pushed) -> Path:
    """A fresh `git clone` of the pushed repository, beside it, after `dvc pull`."""
    clone = pushed.parent / "clone"
    subprocess.run(["git", "clone", "-q", str(pushed), str(clone)], check=True, timeout=60)
    assert not (clone / "data/normalized").exists() and not (clone / "models/resnet").exists()
    sh(clone, "dvc", "pull")
    return clone


def test_the_committed_default_remote_is_a_folder_beside_the_checkout():
    assert remotes(ROOT) == {"storage": str(ROOT.parent / STORAGE)}
    assert sh(ROOT, "dvc", "remote", "default", timeout=60).stdout.strip() == "storage"


def test_push_sends_data_and_models_to_the_default_remote(pushed):
    assert remotes(pushed) == {"storage": str(pushed.parent / STORAGE)}
    assert (pushed.parent / STORAGE / "files" / "md5").is_dir()
    done = sh(pushed, "dvc", "status", "--cloud")
    assert "in sync" in done.stdout, done.stdout


def test_pull_in_a_fresh_clone_gets_data_models_and_reports(pushed, clone):
    for path in PULLED:
        assert (clone / path).is_file(), path
        assert digest(clone / path) == digest(pushed / path), path
    for path in ("metrics/resnet.json", "metrics/evaluate.json", "dvc.lock"):  # in git, not in the remote
        assert (clone / path).read_text() == (pushed / path).read_text(), path


def test_a_pulled_clone_is_up_to_date_and_retrains_nothing(clone):
    status = sh(clone, "dvc", "status")
    assert "up to date" in status.stdout.lower(), status.stdout
    done = sh(clone, "dvc", "repro")
    assert "Running stage" not in done.stdout, done.stdout


@pytest.fixture(scope="module")
def sweep(pushed) -> dict[str, dict]:
    """Two queued experiments (train.resnet.seed=1, =2) run by one queue worker: name -> queue log text."""
    names = {}
    for seed in SWEEP:
        done = sh(pushed, "dvc", "exp", "run", "--queue", "-S", f"train.resnet.seed={seed}", timeout=120)
        names[seed] = done.stdout.split("Queued experiment '")[1].split("'")[0]
    try:
        sh(pushed, "dvc", "queue", "start", "-j", "1", timeout=60, tracking_uri=False)
        deadline = time.monotonic() + QUEUE_TIMEOUT_S
        while True:
            status = sh(pushed, "dvc", "queue", "status", timeout=60).stdout
            rows = {line.split()[1]: line.split()[-1] for line in status.splitlines()
                    if len(line.split()) > 2 and line.split()[1] in names.values()}
            if len(rows) == len(SWEEP) and all(s not in ("Queued", "Running") for s in rows.values()):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the queue did not finish in {QUEUE_TIMEOUT_S} s:\n{status}")
            time.sleep(3)
    finally:
        sh(pushed, "dvc", "queue", "stop", check=False, timeout=60)
    logs = {name: sh(pushed, "dvc", "queue", "logs", name, check=False, timeout=60).stdout
            for name in names.values()}
    assert set(rows.values()) == {"Success"}, f"{status}\n" + "\n".join(logs.values())
    return {name: {"seed": seed, "log": logs[name]} for seed, name in names.items()}


def test_a_queued_sweep_records_two_experiments_with_their_own_metrics(pushed, sweep):
    table = json.loads(sh(pushed, "dvc", "exp", "show", "--json", timeout=120).stdout)
    experiments = {e["name"]: e["revs"][0] for commit in table for e in (commit.get("experiments") or [])}
    assert set(sweep) <= set(experiments), f"dvc exp show lists {sorted(experiments)}"
    results = {}
    for name, run in sweep.items():
        data = experiments[name]["data"]
        assert data["params"]["params.yaml"]["data"]["train"]["resnet"]["seed"] == run["seed"]
        assert "resnet" in data["metrics"]["metrics/headline.json"]["data"], "exp show lists its headline"
        # The full figures, in the experiment's own commit: not the timings, they differ anyway.
        metrics = json.loads(sh(pushed, "git", "show", f"{experiments[name]['rev']}:metrics/resnet.json").stdout)
        results[name] = (metrics["train_running_loss"], metrics["val_loss"])
    assert len(set(results.values())) == len(SWEEP), results


def test_queued_experiments_record_into_the_project_store_by_default(pushed, sweep):
    # The queue runs each experiment in a temporary copy under .dvc/tmp/exps/, deleted afterwards; with no
    # MLFLOW_TRACKING_URI the runs must still land in mlflow.db at the project root.
    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{pushed / 'mlflow.db'}")
    try:
        runs = mlflow.search_runs(experiment_names=["cifar10-resnet-vs-cnn"], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    seeds = [r.data.params.get("seed") for r in runs if r.data.tags.get("dvc.stage") == "train_resnet"]
    assert sorted(seeds) == ["0"] + [str(s) for s in SWEEP]


def test_a_sweep_point_retrains_only_the_resnet_and_evaluates(sweep):
    for name, run in sweep.items():
        assert ran_stages(run["log"]) == ["train_resnet", "evaluate"], f"{name}:\n{run['log']}"
