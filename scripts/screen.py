"""Screen ResNet recipes: one short training per candidate, every one an MLflow run, one table.

Run from the project root (scripts/device_run.sh --screen calls it on the GPU machine):

    python scripts/screen.py --archive PATH --md5 MD5 --out DIR [--grid configs/screens/margin.yaml]
                             [--seeds 0] [--budget-s 480] [-S key=value ...]

The grid file maps a label to overrides ({}: the recipe unchanged); an optional `base:` entry holds
overrides under every candidate, so that a screen keeps its meaning when params.yaml changes. Each
candidate is trained by the pipeline's own train_resnet stage under the MLflow experiment
`cifar10-screening`, so the search can be browsed and compared in `mlflow ui`. After every run
DIR/<grid>.csv (one row per run, with the candidate's compute relative to the base's),
DIR/<grid>_epochs.csv (every epoch of every run) and DIR/mlflow.db are rewritten, so a call cut short
still returns what it did; docs/screens/ keeps the committed ones. A run is skipped when 1.25 times
the longest run so far would pass --budget-s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import yaml

from pipeline import config as config_module
from pipeline.compute import training_flops
from pipeline import paths, tracking
from pipeline.stages import download, normalize, train


EXPERIMENT = "cifar10-screening"
SAFETY = 1.25  # a run starts only if this many times the longest run so far still fits the budget


def overrides_of(changes: dict) -> list[str]:
    """{key: value} -> ["key=value"], values written as YAML flow (JSON is YAML) so lists survive."""
    return [f"{key}={json.dumps(value)}" for key, value in changes.items()]


def compute(cfg: config_module.Config) -> float:
    """Training FLOPs of the whole schedule (forward and backward, every epoch), in PFLOP."""
    recipe = cfg.train.resnet
    return training_flops(recipe, 50_000 - cfg.data.val_size) / 1e15


def row(label: str, seed: int, base: dict, changes: dict, metrics: dict, seconds: float,
        relative_compute: float, data_md5: str) -> dict:
    """One run's line of <grid>.csv; the device and precision as the training run recorded them in MLflow."""
    run_id = json.loads(paths.model_tracking_file("resnet").read_text())["run_id"]
    tags = mlflow.get_run(run_id).data.tags
    return {"label": label, "seed": seed, "base": json.dumps(base), "changes": json.dumps(changes),
            "relative_compute": relative_compute,
            "selected_epoch": metrics["selected_epoch"], "epochs": metrics["epochs"],
            "val_acc": metrics["val_acc"], "train_running_acc": metrics["train_running_acc"],
            "train_clean_subset_acc": metrics["train_clean_subset_acc"], "seconds": seconds,
            "device": tags.get("device"), "precision": tags.get("precision"), "run": run_id[:8],
            "data_md5": data_md5}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", required=True)
    parser.add_argument("--md5", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--grid", type=Path, default=Path("configs/screens/margin.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budget-s", type=float, default=float("inf"))
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    grid = yaml.safe_load(args.grid.read_text(encoding="utf-8")) or {}
    grid_base = grid.pop("base", None) or {}
    base = [f"data.url={args.archive}", f"data.md5={args.md5}", f"train.experiment={EXPERIMENT}",
            "train.log_model=false", *overrides_of(grid_base), *args.overrides]
    started = time.perf_counter()

    cfg = config_module.load(overrides=base)
    download.run(cfg)
    normalize.run(cfg)
    default_compute = compute(cfg)  # the recipe with the grid's base alone
    rows, epochs, longest = [], [], 0.0
    for seed in args.seeds:
        for label, changes in grid.items():
            cfg = config_module.load(overrides=[*base, *overrides_of(changes or {}), f"train.resnet.seed={seed}"])
            elapsed = time.perf_counter() - started
            if elapsed + SAFETY * longest > args.budget_s:
                print(f"== skipping {label} seed {seed}: the {args.budget_s:.0f} s budget", flush=True)
                continue
            paths.checkpoint_file("resnet").unlink(missing_ok=True)  # every candidate trains afresh
            run_started = time.perf_counter()
            metrics = train.run(cfg, "resnet", progress=False)
            seconds = time.perf_counter() - run_started
            longest = max(longest, seconds)
            rows.append(row(label, seed, grid_base, changes or {}, metrics, seconds,
                            compute(cfg) / default_compute, cfg.data.md5))
            history = pd.read_csv(paths.history_file("resnet")).assign(label=label, seed=seed)
            epochs.append(history)
            print(f"== {label} seed {seed}: val {metrics['val_acc']:.2%} running {metrics['train_running_acc']:.2%} "
                  f"epoch {metrics['selected_epoch']} ({seconds:.0f} s)", flush=True)
            pd.DataFrame(rows).to_csv(args.out / f"{args.grid.stem}.csv", index=False)
            pd.concat(epochs).to_csv(args.out / f"{args.grid.stem}_epochs.csv", index=False)
            tracking.backup_store(args.out / "mlflow.db")
    if rows:
        print(pd.DataFrame(rows).drop(columns="changes").to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
