"""Acceptance run on the full data set: the pipeline, three seeds of the default ResNet, the problem's
own recipe beside it, the speed bench, and one compact results table.

Run from the project root (scripts/device_run.sh calls it on the GPU machine):

    python scripts/acceptance.py --archive PATH --md5 MD5 --out DIR [--seeds 0 1 2] [-S key=value ...]

Every stage is the pipeline's own (pipeline.stages), in this one process; MLflow records each run as
usual. Writes DIR/results.md, DIR/results.json and DIR/bench.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipeline import config as config_module
from pipeline import paths
from pipeline.stages import download, evaluate, normalize, train

RECIPE = Path("configs/problem_recipe.yaml")
FIGURES = ["train_running_acc", "train_acc", "val_acc", "test_acc", "gap", "train_time_s"]
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's H100 SXM datasheet figure, dense (no sparsity)


def timed(label: str, times: dict, fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    times[label] = time.perf_counter() - started
    print(f"== {label}: {times[label]:.1f} s", flush=True)
    return result


def summarize(runs: list[dict]) -> dict:
    return {k: {"mean": statistics.fmean(r[k] for r in runs),
                "std": statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0,
                "values": [r[k] for r in runs]} for k in FIGURES}


def row(name: str, s: dict) -> str:
    def cell(k: str) -> str:
        if k == "train_time_s":
            return f"{s[k]['mean']:.1f} ± {s[k]['std']:.1f}"
        return f"{s[k]['mean']:.2%} ± {s[k]['std']:.2%}"
    return f"| {name} | " + " | ".join(cell(k) for k in FIGURES) + " |"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", required=True)
    parser.add_argument("--md5", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--candidates", nargs="*", default=sorted(map(str, Path("configs/candidates").glob("*.yaml"))),
                        help="other ResNet configurations (overlays), one run each (default: configs/candidates/)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = [f"data.url={args.archive}", f"data.md5={args.md5}", *args.overrides]

    def config(*extra: str, overlay: Path | str | None = None) -> config_module.Config:
        return config_module.load(overrides=[*base, *extra], overlays=[overlay] if overlay else [])

    times: dict[str, float] = {}
    cfg = config()
    timed("download", times, download.run, cfg)
    timed("normalize", times, normalize.run, cfg)
    timed("train_baseline", times, train.run, cfg, "baseline", progress=False)

    results: dict[str, list[dict]] = {"baseline": [], "resnet (default params)": [], "problem recipe": []}

    def evaluated(run_cfg, label: str) -> dict:
        metrics = timed(f"evaluate {label}", times, evaluate.run, run_cfg)
        if not results["baseline"]:  # the same baseline model every time: record it once
            results["baseline"].append(metrics["baseline"])
        return metrics["resnet"]

    recipe_cfg = config(overlay=RECIPE)
    timed("train_resnet problem recipe", times, train.run, recipe_cfg, "resnet", progress=False)
    results["problem recipe"].append(evaluated(recipe_cfg, "problem recipe"))
    for candidate in args.candidates:
        label = f"candidate {Path(candidate).stem}"
        candidate_cfg = config(overlay=candidate)
        timed(f"train_resnet {label}", times, train.run, candidate_cfg, "resnet", progress=False)
        results[label] = [evaluated(candidate_cfg, label)]
    # Seeds last to first, so that the workspace ends with the default seed's model and report.
    for seed in reversed(args.seeds):
        seed_cfg = config(f"train.resnet.seed={seed}")
        timed(f"train_resnet seed {seed}", times, train.run, seed_cfg, "resnet", progress=False)
        results["resnet (default params)"].append(evaluated(seed_cfg, f"seed {seed}"))

    bench_file = args.out / "bench.json"
    subprocess.run([sys.executable, "bench/train_speed.py", "--json", str(bench_file), *sum(
        (["-S", o] for o in base), [])], check=True)
    bench = json.loads(bench_file.read_text())

    summary = {name: summarize(runs) for name, runs in results.items()}
    first = args.seeds[0]
    pipeline_s = sum(times[k] for k in ("download", "normalize", "train_baseline", f"train_resnet seed {first}",
                                        f"evaluate seed {first}"))
    lines = [
        "| configuration | train acc (running) | train acc (clean) | val acc | test acc | gap | train time (s) |",
        "|---|---|---|---|---|---|---|",
        *[row(f"{name} (n={len(results[name])})", s) for name, s in summary.items()],
        "",
        f"Device: {bench['device']}, torch {bench['torch']}. Whole pipeline for seed {first} (download, normalize, "
        f"both trainings, evaluate, in one process): {pipeline_s:.0f} s.",
        "",
        "| model | batch | images/s | ms/step | train GFLOP/image | TFLOP/s | fraction of bf16 peak |",
        "|---|---|---|---|---|---|---|",
        *[f"| {name} | {b['batch_size']} | {b['images_per_s']:.0f} | {b['ms_per_step']:.2f} | "
          f"{b['train_gflops_per_image']:.3f} | {b['achieved_tflops']:.1f} | "
          f"{b['achieved_tflops'] / args.peak_tflops:.1%} |" for name, b in bench["models"].items()],
        "",
        "Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()),
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "runs": results, "times": times,
                                                       "bench": bench}, indent=2, default=str))
    shutil.copy(paths.REPORTS / "report.md", args.out / "report.md")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
