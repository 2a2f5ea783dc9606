"""bench/train_speed.py: it runs the pipeline's own training step and reports consistent figures."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


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
    # The baseline's first convolution alone: 3x3x3 multiply-adds per output, 4 channels, 32x32 outputs,
    # counted twice (multiply and add) in the forward pass: the count is at least that.
    assert results["models"]["baseline"]["train_gflops_per_image"] * 1e9 > 2 * 27 * 4 * 32 * 32
