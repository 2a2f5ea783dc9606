"""dvc.yaml end to end: `dvc repro`, `dvc exp run -S` and `dvc plots` in a temporary git repository,
on a tiny archive served over HTTP from 127.0.0.1. The tests share a copy of the project that conftest built
and reproduced once, and run in file order."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, copy_project, write_params

BIN = Path(sys.executable).parent
STAGES = ["download", "normalize", "train_baseline", "train_resnet", "evaluate"]


def sh(repo: Path, *args: str, check: bool = True, tracking: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": tracking or f"sqlite:///{repo / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def ran_stages(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, built_project) -> Path:
    """The built project (conftest), copied for this module: its tests change it in file order. It has the
    project's .dvc/config, whose autostage stages what DVC changes: the tests restore from HEAD, not the index."""
    return copy_project(built_project, tmp_path_factory.mktemp("dvc"))


def test_repro_runs_all_five_stages(repo, built_project):
    assert ran_stages(built_project.repro_output) == STAGES
    for path in ("data/raw/cifar-10-python.tar.gz", "data/normalized/stats.json", "models/baseline/model.pt",
                 "models/resnet/model.pt", "metrics/evaluate.json", "reports/report.md",
                 "plots/evaluate/confusion_resnet.csv"):
        assert (repo / path).exists(), path
    report = (repo / "reports/report.md").read_text()
    assert "| validation accuracy" in report and "baseline" in report and "resnet" in report
    assert json.loads((repo / "metrics/evaluate.json").read_text())["all_targets_hold"] is True


def test_runs_of_one_repro_are_together_in_mlflow(repo):
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    try:
        runs = mlflow.search_runs(experiment_names=["cifar10-resnet-vs-cnn"], output_format="list")
        stages = {r.data.tags.get("dvc.stage"): r for r in runs if "dvc.stage" in r.data.tags}
        assert set(stages) == {"train_baseline", "train_resnet", "evaluate"}
        parents = {r.data.tags["mlflow.parentRunId"] for r in stages.values()}
        assert len(parents) == 1, "one parent run groups the runs of one dvc repro"
        reproduced = sh(repo, "git", "rev-parse", "HEAD~1").stdout.strip()  # the commit before "tiny repro"
        assert {r.data.tags.get("mlflow.source.git.commit") for r in stages.values()} == {reproduced}, \
            "MLflow records the commit the stages ran from"
        champion = mlflow.pyfunc.load_model("models:/cifar10-resnet@champion")
        images = np.load(repo / "data/normalized/test_images.npy")[:4].astype(np.float32)
        assert np.asarray(champion.predict(images)).shape == (4, 10)
        version = MlflowClient().get_model_version_by_alias("cifar10-resnet", "champion")
        assert version.run_id == stages["train_resnet"].info.run_id
    finally:
        mlflow.set_tracking_uri(None)


def test_second_repro_is_up_to_date(repo):
    done = sh(repo, "dvc", "repro")
    assert ran_stages(done.stdout) == []
    assert "up to date" in done.stdout.lower()


def test_plots_and_metrics_render(repo):
    shown = json.loads(sh(repo, "dvc", "metrics", "show", "--json").stdout)
    headline = next(iter(_values(shown, "metrics/headline.json")))["data"]
    evaluated = json.loads((repo / "metrics/evaluate.json").read_text())
    for name in ("baseline", "resnet"):
        assert headline[name]["val"] == round(evaluated[name]["val_acc"], 4)
        assert headline[name]["running"] == round(evaluated[name]["train_running_acc"], 4)
        assert headline[name]["clean"] == round(evaluated[name]["train_acc"], 4)
        assert set(headline[name]) == {"val", "test", "running", "clean", "epoch", "min"}
    assert headline["all_targets_hold"] == evaluated["all_targets_hold"]
    table = sh(repo, "dvc", "metrics", "show").stdout
    assert max(len(line) for line in table.splitlines()) <= 250, table
    sh(repo, "dvc", "plots", "show", "-o", "dvc_plots")
    html = (repo / "dvc_plots/index.html").read_text()
    assert "confusion_resnet.csv" in html and "history.csv" in html
    # Each curve (file and column) has its own colour, not one colour per revision told apart by dash.
    plots = json.loads(sh(repo, "dvc", "plots", "show", "--json").stdout)["data"]
    curves = plots["Learning curves (training accuracy is the running, training-mode figure)"][0]["content"]
    colours = [layer["encoding"]["color"] for layer in curves["layer"] if "color" in layer.get("encoding", {})]
    assert colours and all(c["field"] == "curve" for c in colours) and "color" not in curves["encoding"]
    named = {v["filename::field"] for v in curves["data"]["values"]}
    assert named == {f"{m}/history.csv::{f}" for m in ("baseline", "resnet") for f in ("train_running_acc", "val_acc")}


def test_results_document_is_written_from_the_committed_outputs(repo):
    sh(repo, sys.executable, "-m", "pipeline.results")
    evaluated = json.loads((repo / "metrics/evaluate.json").read_text())
    history = (repo / "plots/resnet/history.csv").read_text().splitlines()
    results = (repo / "docs/results.md").read_text()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in results.splitlines()
            if line.startswith("|")]
    assert ["validation accuracy", f"{evaluated['baseline']['val_acc']:.2%}",
            f"{evaluated['resnet']['val_acc']:.2%}"] in rows
    assert results.count("| 1 ") + results.count("| 2 ") >= len(history) - 1, "one row per ResNet epoch"
    assert "an archive that is neither the official one nor the project's offline copy" in results  # the tiny one
    assert (repo / "docs/learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    shutil.rmtree(repo / "docs")


def test_a_resnet_param_reruns_only_the_resnet_and_evaluate(repo):
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "results document", "--allow-empty")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["resnet"]["seed"] = 1
    write_params(repo, params)
    done = sh(repo, "dvc", "repro")
    assert ran_stages(done.stdout) == ["train_resnet", "evaluate"]


def test_exp_run_with_set_param_records_an_experiment_with_other_metrics(repo):
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "resnet seed 1")
    done = sh(repo, "dvc", "exp", "run", "-S", "train.resnet.epochs=3", "-S", "train.log_model=false")
    assert "train_resnet" in done.stdout
    table = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    experiments = [e for commit in table for e in (commit.get("experiments") or [])]
    assert experiments, "dvc exp show lists the new experiment"
    committed = json.loads(sh(repo, "git", "show", "HEAD:metrics/resnet.json").stdout)
    experiment = json.loads((repo / "metrics/resnet.json").read_text())  # dvc exp run applies it to the workspace
    assert (committed["epochs"], experiment["epochs"]) == (2, 3)
    assert experiment != committed
    diff = sh(repo, "dvc", "metrics", "diff", "HEAD", "--json")
    assert "metrics/headline.json" in json.loads(diff.stdout)


def test_exp_run_refuses_an_invalid_value_with_the_key_named_and_says_what_it_left(repo):
    sh(repo, "git", "checkout", "HEAD", "--", ".")
    done = sh(repo, "dvc", "exp", "run", "-S", "train.resnet.epochs=31", check=False)
    assert done.returncode != 0
    assert "train.resnet.epochs" in done.stdout + done.stderr
    assert "`git checkout params.yaml` restores the committed params" in done.stdout + done.stderr
    assert (repo / "data/params.ok").exists(), "the check's output stays"
    sh(repo, "git", "checkout", "HEAD", "--", "params.yaml")


def test_a_bad_param_stops_repro_in_the_check_stage_and_deletes_nothing(repo):
    sh(repo, "git", "checkout", "HEAD", "--", ".")
    before = {p: (repo / p).read_bytes() for p in ("models/resnet/model.pt", "metrics/resnet.json",
                                                   "models/baseline/model.pt", "data/normalized/stats.json")}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["resnet"]["model"]["dropout"] = 1.5
    write_params(repo, params)
    done = sh(repo, "dvc", "repro", check=False)
    assert done.returncode != 0
    assert "train.resnet.model.dropout" in done.stdout + done.stderr
    assert ran_stages(done.stdout) == [], "no stage after the check ran"
    assert {p: (repo / p).read_bytes() for p in before} == before
    sh(repo, "git", "checkout", "HEAD", "--", "params.yaml")


TRAIN_RESNET_OUTPUTS = ("models/resnet/model.pt", "models/resnet/mlflow.json", "metrics/resnet.json",
                        "plots/resnet/history.csv")


def committed_outputs(repo: Path) -> dict[str, bytes]:
    sh(repo, "git", "checkout", "HEAD", "--", ".")
    # As committed, whatever git's stat cache says of files that an earlier test's experiment rewrote.
    for path in ("metrics/resnet.json", "plots/resnet/history.csv"):
        (repo / path).write_bytes(subprocess.run(["git", "show", f"HEAD:{path}"], cwd=repo, capture_output=True,
                                                 check=True).stdout)
    sh(repo, "dvc", "checkout")
    return {p: (repo / p).read_bytes() for p in TRAIN_RESNET_OUTPUTS}


def test_a_stage_that_fails_after_it_started_keeps_its_previous_outputs_byte_for_byte(repo):
    before = committed_outputs(repo)
    status = sh(repo, "dvc", "status", "train_resnet").stdout
    images = repo / "data/normalized/train_images.npy"
    images.unlink()  # a new file: the DVC cache behind the old one stays intact
    images.write_bytes(b"not an array")  # the stage starts, then fails reading its input
    done = sh(repo, "dvc", "repro", "-f", "-s", "train_resnet", check=False)
    assert done.returncode != 0 and "Running stage 'train_resnet'" in done.stdout
    assert {p: (repo / p).read_bytes() for p in TRAIN_RESNET_OUTPUTS} == before
    sh(repo, "dvc", "checkout", "--force", "data/normalized")  # undo the sabotage
    assert sh(repo, "dvc", "status", "train_resnet").stdout == status


def test_a_repro_killed_in_training_keeps_the_previous_outputs_byte_for_byte(repo):
    before = committed_outputs(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["resnet"].update(epochs=30, schedule_epochs=None)  # long enough to be killed in the middle
    write_params(repo, params)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    checkpoint = repo / "checkpoints/resnet.pt"
    checkpoint.unlink(missing_ok=True)
    repro = subprocess.Popen(["dvc", "repro", "train_resnet"], cwd=repo, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.exists() and repro.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the first epoch checkpointed: training is under way
        assert checkpoint.exists() and repro.poll() is None, "premise: killed while training"
    finally:
        os.killpg(repro.pid, signal.SIGKILL)
        repro.wait()
    assert {p: (repo / p).read_bytes() for p in TRAIN_RESNET_OUTPUTS} == before
    sh(repo, "git", "checkout", "HEAD", "--", "params.yaml")
    sh(repo, "dvc", "status", "train_resnet")  # DVC still reads the project after the kill


def test_make_repro_works_from_a_shell_without_the_venv_on_path(repo):
    # The README's first command, from a plain shell: DVC must run the stages with the venv's python.
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, repo / name)  # copy2 keeps pyproject older than the venv's install stamp
    venv = Path(sys.prefix)
    if not (venv / "bin" / ".installed").exists():
        pytest.skip("the tests do not run in a venv that `make install` made")
    sh(repo, "git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock", "metrics", "plots")
    sh(repo, "dvc", "checkout")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["resnet"]["seed"] = 3
    write_params(repo, params)
    plain = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    plain.update(PATH="/usr/local/bin:/usr/bin:/bin", MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}")
    done = subprocess.run(["make", "repro", f"VENV={venv}"], cwd=repo, env=plain, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Running stage 'train_resnet'" in done.stdout
    assert json.loads((repo / "metrics/resnet.json").read_text())["epochs"] == 2


def _values(tree, key: str):
    """Every value stored under `key` anywhere in a nested JSON tree (dvc exp show --json)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                yield v
            yield from _values(v, key)
    elif isinstance(tree, list):
        for item in tree:
            yield from _values(item, key)


def test_make_quick_runs_every_stage_in_a_temporary_copy_and_leaves_the_workspace_alone(repo):
    venv = Path(sys.prefix)
    if not (venv / "bin" / ".installed").exists():
        pytest.skip("the tests do not run in a venv that `make install` made")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, repo / name)
    sh(repo, "git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock", "metrics", "plots")
    sh(repo, "dvc", "checkout")
    kept = ("params.yaml", "dvc.lock", "metrics/resnet.json", "metrics/evaluate.json", "models/resnet/model.pt")
    before = {p: (repo / p).read_bytes() for p in kept}
    store = f"sqlite:///{repo / 'quick.db'}"  # a new store: the quick run creates the experiment
    plain = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    plain.update(PATH="/usr/local/bin:/usr/bin:/bin", MLFLOW_TRACKING_URI=store)
    done = subprocess.run(["make", "quick", f"VENV={venv}", "ARGS=-S train.log_model=true"], cwd=repo, env=plain,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ran_stages(done.stdout) == ["train_baseline", "train_resnet", "evaluate"], done.stdout
    assert {p: (repo / p).read_bytes() for p in kept} == before, "the workspace keeps the committed run"
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    epochs = [m["data"]["train"]["resnet"]["epochs"] for m in _values(shown, "params.yaml") if "data" in m]
    assert 1 in epochs and 2 in epochs, "dvc exp show lists the quick run beside the workspace's"
    assert any("resnet" in m.get("data", {}) for m in _values(shown, "metrics/headline.json")), \
        "with its headline figures"
    runs = MlflowClient(store).search_runs(
        [e.experiment_id for e in MlflowClient(store).search_experiments()],
        filter_string="tags.`dvc.stage` = 'train_resnet' and params.epochs = '1'")
    assert runs, "the quick run's training is recorded in the project's MLflow store"
    # Its artifacts outlive DVC's temporary copy: the registered model loads, the report reads.
    experiment = MlflowClient(store).get_experiment(runs[0].info.experiment_id)
    assert ".dvc/tmp" not in experiment.artifact_location and str(repo) in experiment.artifact_location
    mlflow.set_tracking_uri(store)
    try:
        version = MlflowClient().search_model_versions("name = 'cifar10-resnet'")[0].version
        loaded = mlflow.pytorch.load_model(f"models:/cifar10-resnet/{version}")
        images = np.load(repo / "data/normalized/test_images.npy")[:2].astype(np.float32)
        assert tuple(loaded(torch.from_numpy(images)).shape) == (2, 10)
        evaluated = mlflow.search_runs(experiment_ids=[experiment.experiment_id], output_format="list",
                                       filter_string="tags.`dvc.stage` = 'evaluate'")[0]
        report = mlflow.artifacts.download_artifacts(run_id=evaluated.info.run_id, artifact_path="report/report.md")
        assert "validation accuracy" in Path(report).read_text()
    finally:
        mlflow.set_tracking_uri(None)


def test_make_plots_writes_a_page_that_opens_without_internet(repo):
    venv = Path(sys.prefix)
    if shutil.which("npm") is None or not (venv / "bin" / ".installed").exists():
        pytest.skip("needs npm and a venv that `make install` made")
    (repo / "scripts").mkdir(exist_ok=True)
    shutil.copy(ROOT / "scripts/offline_plots_template.py", repo / "scripts")
    done = subprocess.run(["make", "plots", f"VENV={venv}"], cwd=repo, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, done.stdout + done.stderr
    html = (repo / "dvc_plots/index.html").read_text()
    assert "history.csv" in html and "confusion_resnet.csv" in html
    assert "<script src" not in html and "cdn.jsdelivr" not in html, "nothing is loaded from elsewhere"
    assert html.count("<script>") >= 3 and len(html) > 500_000, "Vega, Vega-Lite and Vega-Embed are inline"
