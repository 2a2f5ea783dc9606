"""bench/: train_speed.py runs the pipeline's own training step and reports consistent figures; repro_time.py
times a forced `dvc repro` of the tiny project stage by stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, copy_project


def test_bench_reports_speed_and_flops_for_both_models(tmp_path):
    out = tmp_path / "bench.json"
    small = ["-S", "train.baseline.model.widths=[4,8]", "-S", "train.baseline.batch_size=8",
             "-S", "train.resnet.model.width=4", "-S", "train.resnet.model.blocks=[1,1]",
             "-S", "train.resnet.batch_size=8", "-S", "train.device=cpu"]
    done = subprocess.run([sys.executable, "bench/train_speed.py", "--steps", "2", "--warmup", "1",
                           "--json", str(out), *small], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and set(results["models"]) == {"baseline", "resnet"}
    assert results["compile"] is False  # train.compile's default: the eager step
    for name, r in results["models"].items():
        assert r["batch_size"] == 8 and r["parameters"] > 0
        assert r["images_per_s"] > 0
        # The figures agree with each other: images/s from ms/step, FLOP rate from FLOP/image.
        assert abs(r["images_per_s"] - 8 / (r["ms_per_step"] / 1000)) < 1e-6 * r["images_per_s"]
        assert abs(r["achieved_tflops"] - r["train_gflops_per_image"] * r["images_per_s"] / 1000) < 1e-9 + 1e-6 * r[
            "achieved_tflops"]
        assert name in done.stdout
        epochs = yaml.safe_load((ROOT / "params.yaml").read_text())["train"][name]["epochs"]
        assert r["train_pflops_run"] * 1e15 == pytest.approx(r["train_gflops_per_image"] * 1e9 * 45_000 * epochs)
    # The baseline's first convolution alone: 3x3x3 multiply-adds per output, 4 channels, 32x32 outputs,
    # counted twice (multiply and add) in the forward pass: the count is at least that.
    assert results["models"]["baseline"]["train_gflops_per_image"] * 1e9 > 2 * 27 * 4 * 32 * 32


def test_repro_time_times_each_forced_stage_and_writes_nothing_for_a_failed_run(tmp_path, built_project):
    repo = copy_project(built_project, tmp_path)
    out = tmp_path / "repro_time.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)

    def bench(*dvc_args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "bench/repro_time.py"), "--json", str(out), *dvc_args],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=600)

    failed = bench("no_such_stage")
    assert failed.returncode != 0 and not out.exists(), "a failed run's times are not written"

    # Up to normalize, to keep the test short: the stages that lead there run, the trainings do not.
    done = bench("normalize")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Running stage 'normalize'" in done.stdout and "wrote data/normalized" in done.stdout  # passed through
    results = json.loads(out.read_text())
    # --force: every stage up to the target runs, although all are up to date, in the pipeline's order.
    assert list(results["stages_s"]) == ["dvc", "check", "download", "normalize"]
    assert all(s > 0 for s in results["stages_s"].values())
    assert sum(results["stages_s"].values()) == pytest.approx(results["total_s"])
    md5 = yaml.safe_load((repo / "params.yaml").read_text())["data"]["md5"]
    assert results["returncode"] == 0 and results["data_md5"] == md5
