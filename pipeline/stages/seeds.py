"""python -m pipeline seeds: the ResNet recipe of params.yaml trained with several seeds -> metrics/seeds.json.

The seed that params.yaml names is the `dvc repro` run: its figures come from metrics/evaluate.json
when models/resnet was trained with these params, so only the other seeds train here. Each of them is
one MLflow run (tag `seed`) in the params' experiment, checkpoints every epoch to
checkpoints/resnet-seed<N>-<precision>.pt and resumes from there when rerun, and is scored as `evaluate` scores:
every split in eval mode. A seed that metrics/seeds.json already holds for the same recipe is taken from
there, not trained again (unless `retrain`). Test accuracy is reported, never used to choose anything.

A row is one (seed, precision): `-S train.precision=fp32` adds fp32 rows beside the bf16 ones, which stay.
The mean and std are over the rows of the pipeline run's own precision (metrics/evaluate.json).
"""

from __future__ import annotations

import json
import statistics

import mlflow

from pipeline import config as config_module
from pipeline import data, evaluate, models, paths, tracking
from pipeline.config import Config
from pipeline.device import cpu_model, device_name, select_device, uses_bf16
from pipeline.errors import ModelFileError
from pipeline.train import Checkpoint, fit

FIGURES = ("val_acc", "test_acc", "train_running_acc", "train_acc", "selected_epoch", "train_time_s")
LABELS = ("seed", "precision", "machine")  # what a row is of: seeds.json holds one row per (seed, precision)
SEEDS_FILE = paths.METRICS / "seeds.json"  # every seed's row, the recipe, mean and spread (docs/results.md)
SEEDS_MEAN_FILE = paths.METRICS / "seeds_mean.json"  # what `dvc metrics show` lists of them


def precision_of(config: Config) -> str:
    """What `train.precision` resolves to on this machine: "bf16" or "fp32"."""
    return "bf16" if uses_bf16(config.train.precision, select_device(config.train.device)) else "fp32"


def machine() -> str:
    """The processor (or GPU) the rows trained on: a time is a figure of its machine."""
    device = select_device("auto")
    return device_name(device) if device.type != "cpu" else cpu_model()


def with_seed(config: Config, seed: int) -> Config:
    return config_module.from_dict(config_module.apply_overrides(config.model_dump(mode="json"),
                                                                 [f"train.resnet.seed={seed}"]))


def from_pipeline_run(config: Config) -> dict | None:
    """The figures of the `dvc repro` run for the params' own seed, or None if its outputs are not of these params."""
    evaluated = paths.METRICS / "evaluate.json"
    if not (paths.model_file("resnet").exists() and evaluated.exists()):
        return None
    try:
        models.load_trained(config, "resnet")
    except ModelFileError:  # trained with other params: not this recipe's seed
        return None
    evaluated = json.loads(evaluated.read_text())
    ran_on = evaluated.get("machine", {})
    return {"seed": config.train.resnet.seed, "precision": ran_on.get("precision", precision_of(config)),
            "machine": ran_on.get("cpu") if ran_on.get("device") == "cpu" else ran_on.get("device"),
            **{k: evaluated["resnet"][k] for k in FIGURES}}


def pipeline_precision(config: Config) -> str:
    """The precision of the `dvc repro` run (metrics/evaluate.json), which the mean and std are of."""
    try:
        return json.loads((paths.METRICS / "evaluate.json").read_text())["machine"]["precision"]
    except (OSError, ValueError, KeyError, TypeError):
        return precision_of(config)


def recorded_seeds(config: Config) -> dict[tuple[int, str], dict]:
    """The rows of metrics/seeds.json by (seed, precision), if that file is of this recipe; else none. A row
    without a precision is from before rows had one: bf16, the precision every such run used."""
    try:
        recorded = json.loads(SEEDS_FILE.read_text())
    except (OSError, ValueError):  # absent or not JSON: nothing to reuse
        return {}
    if not isinstance(recorded, dict) or recorded.get("recipe") != config.train.resnet.without_seed():
        return {}
    rows = recorded.get("seeds")
    if not isinstance(rows, list):
        return {}
    # A row is reused only if it is whole: a seed number and a number for every figure.
    whole = [{"precision": "bf16", "machine": None, **row} for row in rows
             if isinstance(row, dict) and isinstance(row.get("seed"), int)
             and all(isinstance(row.get(k), (int, float)) for k in FIGURES)]
    return {(row["seed"], row["precision"]): row for row in whole}


def train_seed(config: Config, progress: bool) -> dict:
    """Train the ResNet of `config` (its seed set) outside DVC's outputs and score it on every split."""
    seed, cfg = config.train.resnet.seed, config.train.resnet
    splits = {name: data.load_split(paths.NORMALIZED, name) for name in data.SPLITS}
    key = config.model_fingerprint("resnet")
    precision = precision_of(config)
    checkpoint = Checkpoint(paths.CHECKPOINTS / f"resnet-seed{seed}-{precision}.pt", key)
    resume = checkpoint.load()
    log = tracking.StageLog("resnet")
    with tracking.stage_run(config, "seeds", run_name=f"resnet seed {seed}",
                            resume_run_id=resume["run_id"] if resume else None, log=log) as run:
        log.do("the seed tag", mlflow.set_tag, "seed", str(seed))
        tracking.record_inputs(config, "resnet", {"train": splits["train"], "val": splits["val"]},
                               data.load_stats(paths.NORMALIZED), do=log.do, resumed=resume is not None)
        checkpoint.run_id = run.info.run_id
        result = fit(cfg, config.train, splits["train"], splits["val"], checkpoint, on_epoch=log.epoch,
                     resume=resume, progress=progress)
        scored = evaluate.evaluate_model(result.model, splits, result.device, config.train.eval_batch_size,
                                         len(evaluate.CIFAR10_CLASSES), result.precision == "bf16",
                                         label=f"seed {seed}")
        chosen = next(r for r in result.history if r["epoch"] == result.selected_epoch)
        row = {
            "seed": seed,
            "precision": result.precision,
            "machine": machine(),
            "val_acc": scored["val_acc"],
            "test_acc": scored["test_acc"],
            "train_running_acc": chosen["train_running_acc"],
            "train_acc": scored["train_acc"],
            "selected_epoch": result.selected_epoch,
            "train_time_s": sum(r["epoch_time_s"] for r in result.history),
        }
        # Scored as evaluate scores: the clean training accuracy is of the whole train split, not of the
        # subset that the training runs' selected/train_clean_acc is of.
        log.do("the seed's figures", mlflow.log_metrics, {
            "selected/val_acc": row["val_acc"], "selected/test_acc": row["test_acc"],
            "selected/train_running_acc": row["train_running_acc"],
            "selected/train_clean_acc_whole_split": row["train_acc"], "speed/train_time_s": row["train_time_s"]})
        log.do("the selected epoch", mlflow.set_tag, "selected_epoch", result.selected_epoch)
    return row


def aggregate(rows: list[dict], precision: str | None = None) -> dict:
    """Every row, and the mean and sample standard deviation of each figure over the rows of `precision`
    (None: all of them)."""
    counted = [r for r in rows if precision is None or r.get("precision") == precision]
    spread = (lambda values: statistics.stdev(values)) if len(counted) > 1 else (lambda values: 0.0)
    return {
        "seeds": rows,
        "aggregated_precision": precision,
        "mean": {k: statistics.fmean(r[k] for r in counted) for k in FIGURES} if counted else {},
        "std": {k: spread([r[k] for r in counted]) for k in FIGURES} if counted else {},
    }


def write(config: Config, rows: dict[tuple[int, str], dict]) -> dict:
    """metrics/seeds.json from the rows so far (bf16 first, then by seed), replaced atomically."""
    ordered = [rows[key] for key in sorted(rows, key=lambda key: (key[1] != "bf16", key))]
    # With the recipe they share: results.py shows only the seeds of the committed one.
    summary = {"recipe": config.train.resnet.without_seed(), **aggregate(ordered, pipeline_precision(config))}
    with paths.replacing(SEEDS_FILE) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    with paths.replacing(SEEDS_MEAN_FILE) as tmp:
        tmp.write_text(json.dumps(mean_headline(summary), indent=2) + "\n")
    return summary


def mean_headline(summary: dict) -> dict:
    """metrics/seeds_mean.json: the mean over seeds in metrics/headline.json's ResNet columns, so that
    `dvc metrics show` lists it as a second line of the same table (the spread: metrics/seeds.json)."""
    mean = summary["mean"]
    if not mean:
        return {}
    return {"resnet": {"val": round(mean["val_acc"], 4), "test": round(mean["test_acc"], 4),
                       "running": round(mean["train_running_acc"], 4), "clean": round(mean["train_acc"], 4),
                       "epoch": round(mean["selected_epoch"], 1), "min": round(mean["train_time_s"] / 60, 1)}}


def run(config: Config, seeds: list[int], progress: bool = True, retrain: bool = False) -> dict:
    """Every seed in turn; the file is rewritten after each, so a run cut short keeps the seeds it finished."""
    tracking.require_tracking("seeds")
    held = recorded_seeds(config)  # kept in the file whatever is retrained: no row is lost
    recorded = {} if retrain else held
    precision = precision_of(config)
    rows: dict[tuple[int, str], dict] = dict(held)
    summary = {}
    for seed in seeds:
        seeded = with_seed(config, seed)
        row = from_pipeline_run(seeded) if seed == config.train.resnet.seed else None
        if row is not None:
            print(f"seed {seed}: from the pipeline's own run (metrics/evaluate.json)")
        elif (seed, precision) in recorded:
            row = {k: recorded[seed, precision][k] for k in (*LABELS, *FIGURES)}
            print(f"seed {seed} ({precision}): from {SEEDS_FILE}, trained earlier with this recipe "
                  "(--retrain trains it again)")
        else:
            print(f"seed {seed}: training the ResNet of params.yaml with train.resnet.seed={seed} in {precision}",
                  flush=True)
            row = train_seed(seeded, progress)
        rows[row["seed"], row["precision"]] = row
        summary = write(config, rows)
        print(f"seed {seed}: val acc {row['val_acc']:.4f}, test acc {row['test_acc']:.4f}, running train acc "
              f"{row['train_running_acc']:.4f}, clean train acc {row['train_acc']:.4f}, epoch {row['selected_epoch']}",
              flush=True)
    mean, std = summary["mean"], summary["std"]
    print(f"wrote {SEEDS_FILE}: val acc {mean['val_acc']:.4f} ± {std['val_acc']:.4f}, running train acc "
          f"{mean['train_running_acc']:.4f} ± {std['train_running_acc']:.4f} over the "
          f"{summary['aggregated_precision']} rows")
    return summary
