"""scripts/screen.py, the recipe screen, on the tiny archive: a grid with a base, two seeds, the table,
the epochs, and the MLflow runs it leaves in --out."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT, tiny_params, write_params

TINY = {"train.resnet.epochs": 1, "train.resnet.model.width": 4, "train.resnet.batch_size": 32}


@pytest.fixture
def screen(tmp_path, archive_url, tiny_archive):
    """Runs the script with a grid in a copy of the project's layout; returns (run, out directory)."""
    write_params(tmp_path, tiny_params(archive_url, tiny_archive[1]))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": TINY, "default": {}, "wider": {"train.resnet.model.width": 8},
                                    "two_epochs": {"train.resnet.epochs": 2}}, sort_keys=False))
    out = tmp_path / "out"

    def run(*args: str) -> subprocess.CompletedProcess:
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        return subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "screen.py"), "--archive", archive_url, "--md5",
             tiny_archive[1], "--out", str(out), "--grid", str(grid), *args],
            cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    return run, out


def test_screen_trains_every_candidate_over_the_base_and_records_each_run(screen, tiny_archive):
    run, out = screen
    done = run("--seeds", "0", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    table = pd.read_csv(out / "grid.csv")  # named after the grid
    assert list(zip(table["label"], table["seed"])) == [
        ("default", 0), ("wider", 0), ("two_epochs", 0), ("default", 1), ("wider", 1), ("two_epochs", 1)]
    assert {json.loads(b)["train.resnet.model.width"] for b in table["base"]} == {4}
    compute = table.groupby("label")["relative_compute"].first()
    # Compute is relative to the base: twice the epochs is twice it, twice the width about four times.
    assert compute["default"] == 1.0 and compute["two_epochs"] == pytest.approx(2.0)
    assert 3.0 < compute["wider"] < 4.5
    assert list(table.groupby("label", sort=False)["epochs"].first()) == [1, 1, 2]
    assert set(table["device"]) == {"cpu"} and set(table["precision"]) <= {"fp32", "bf16"}
    assert set(table["data_md5"]) == {tiny_archive[1]}

    epochs = pd.read_csv(out / "grid_epochs.csv")
    assert len(epochs) == 2 * (1 + 1 + 2)  # one line per epoch of every run
    with sqlite3.connect(out / "mlflow.db") as db:  # the copy that travels back
        runs = {row[0][:8] for row in db.execute(
            "select r.run_uuid from runs r join experiments e on r.experiment_id = e.experiment_id "
            "join tags t on t.run_uuid = r.run_uuid where e.name = 'cifar10-screening' "
            "and t.key = 'dvc.stage' and t.value = 'train_resnet'")}
    assert runs == set(table["run"])


def test_screen_skips_what_would_pass_the_budget(screen):
    run, out = screen
    done = run("--budget-s", "0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("== skipping") == 3
    assert not (out / "grid.csv").exists()
