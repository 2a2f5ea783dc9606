"""scripts/acceptance.py, the GPU acceptance run, on the tiny archive: it must work the first time it
meets a GPU, so CI runs it here (tiny models, one epoch) and checks what it leaves in --out."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import ROOT, tiny_params, write_params

ONE_EPOCH = ["-S", "train.baseline.epochs=1", "-S", "train.resnet.epochs=1",
             "-S", "train.resnet.model.width=4", "-S", "train.resnet.batch_size=32"]  # also over the overlays


@pytest.fixture
def acceptance(tmp_path, archive_url, tiny_archive):
    """Runs the script in a copy of the project's layout; returns (run, out directory)."""
    write_params(tmp_path, tiny_params(archive_url, tiny_archive[1]))
    for folder in ("configs", "bench"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    out = tmp_path / "out"

    def run(*args: str) -> subprocess.CompletedProcess:
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        return subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "acceptance.py"), "--archive", archive_url,
             "--md5", tiny_archive[1], "--out", str(out), *ONE_EPOCH, *args],
            cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    return run, out


def test_acceptance_run_writes_the_table_histories_outputs_and_tracking_store(acceptance):
    run, out = acceptance
    done = run("--seeds", "0", "1", "--candidates", "configs/candidates/wider.yaml", "--no-compile-timing")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    counts = {name: len(runs) for name, runs in results["runs"].items()}
    assert counts == {"baseline": 1, "resnet (default params)": 2, "problem recipe": 1, "candidate wider": 1}
    assert results["skipped"] == []
    seeds = results["summary"]["resnet (default params)"]["val_acc"]
    assert len(seeds["values"]) == 2 and seeds["mean"] == pytest.approx(sum(seeds["values"]) / 2)
    assert set(results["bench"]["models"]) == {"baseline", "resnet"}
    assert results["pipeline_s"] > 0

    table = (out / "results.md").read_text()
    assert "| resnet (default params) (n=2) |" in table and "| problem recipe (n=1) |" in table
    assert "fraction of bf16 peak" in table and "the problem's recipe" in table
    assert sorted(p.name for p in (out / "histories").iterdir()) == [
        "baseline.csv", "candidate_wider.csv", "problem_recipe.csv", "seed_0.csv", "seed_1.csv"]
    with tarfile.open(out / "outputs.tar.gz") as tar:
        assert {"metrics/evaluate.json", "reports/report.md"} <= set(tar.getnames())
    assert (out / "report.md").read_text().startswith("#")
    with sqlite3.connect(out / "mlflow.db") as db:  # the copy that travels back: every training run is in it
        trained = db.execute("select count(*) from tags where key = 'model' and value = 'resnet'").fetchone()[0]
    assert trained == 4


def test_acceptance_run_skips_what_would_pass_the_budget_and_says_so(acceptance):
    run, out = acceptance
    done = run("--seeds", "0", "1", "--candidates", "configs/candidates/wider.yaml", "--budget-s", "0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    # The pipeline itself always runs; everything after it would pass a zero budget.
    assert list(results["runs"]) == ["baseline", "resnet (default params)"]
    assert results["skipped"] == ["problem recipe", "seed 1", "bench", "candidate wider", "compiled"]
    assert "Skipped for the time budget: problem recipe, seed 1, bench, candidate wider, compiled" in (
        out / "results.md").read_text()
