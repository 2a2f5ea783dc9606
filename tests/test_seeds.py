"""pipeline/stages/seeds.py: extra seeds of the ResNet recipe, trained for real on tiny data, and their aggregate."""

from __future__ import annotations

import json
import statistics

import pytest
from mlflow.tracking import MlflowClient

from pipeline import config, paths
from pipeline.stages import download, evaluate, normalize, seeds, train


def test_aggregate_gives_mean_and_sample_std_of_every_figure():
    rows = [{"seed": s, "val_acc": v, "test_acc": v - 0.01, "train_running_acc": 0.9, "train_acc": 0.95,
             "selected_epoch": e, "train_time_s": 100.0 + s} for s, v, e in [(0, 0.86, 10), (1, 0.85, 12), (2, 0.87, 11)]]
    summary = seeds.aggregate(rows)
    assert summary["seeds"] == rows
    assert summary["mean"]["val_acc"] == pytest.approx(0.86)
    assert summary["std"]["val_acc"] == pytest.approx(statistics.stdev([0.86, 0.85, 0.87]))
    assert summary["mean"]["selected_epoch"] == pytest.approx(11.0)
    assert summary["std"]["train_running_acc"] == pytest.approx(0.0)
    assert set(summary["mean"]) == set(summary["std"]) == set(seeds.FIGURES)


def test_a_single_seed_has_zero_spread():
    row = {"seed": 0, **{k: 1.0 for k in seeds.FIGURES}}
    assert seeds.aggregate([row])["std"] == {k: 0.0 for k in seeds.FIGURES}


def test_seeds_reuse_the_pipeline_run_and_train_the_others(project):
    cfg = config.load()
    download.run(cfg)
    normalize.run(cfg)
    train.run(cfg, "baseline", progress=False)
    train.run(cfg, "resnet", progress=False)
    evaluated = evaluate.run(cfg)

    summary = seeds.run(cfg, [0, 1], progress=False)

    written = json.loads((paths.METRICS / "seeds.json").read_text())
    assert written["recipe"] == cfg.train.resnet.without_seed() and "seed" not in written["recipe"]
    assert written == summary
    assert [row["seed"] for row in written["seeds"]] == [0, 1]
    pipeline_row, trained_row = written["seeds"]
    # Seed 0 is the pipeline's own run: its figures are evaluate's, and nothing was retrained for it.
    for key in seeds.FIGURES:
        assert pipeline_row[key] == evaluated["resnet"][key]
    assert not list(paths.CHECKPOINTS.glob("resnet-seed0-*.pt"))
    # Seed 1 trained here, with its own checkpoint and MLflow run, scored on every split.
    assert (paths.CHECKPOINTS / f"resnet-seed1-{seeds.precision_of(cfg)}.pt").exists()
    assert pipeline_row["precision"] == trained_row["precision"] == seeds.precision_of(cfg)
    assert trained_row["machine"] == seeds.machine()
    assert 0.0 <= trained_row["val_acc"] <= 1.0 and 0.0 <= trained_row["test_acc"] <= 1.0
    assert 1 <= trained_row["selected_epoch"] <= cfg.train.resnet.epochs and trained_row["train_time_s"] > 0
    runs = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], filter_string="tags.seed = '1'")
    assert len(runs) == 1
    assert runs[0].data.params["seed"] == "1"
    assert runs[0].data.metrics["selected/val_acc"] == pytest.approx(trained_row["val_acc"])
    assert written["mean"]["val_acc"] == pytest.approx((pipeline_row["val_acc"] + trained_row["val_acc"]) / 2)
    # The DVC outputs of the pipeline's run are untouched.
    assert json.loads((paths.METRICS / "evaluate.json").read_text())["resnet"]["val_acc"] == evaluated["resnet"]["val_acc"]


def test_the_params_seed_trains_when_the_pipeline_outputs_are_of_other_params(project):
    cfg = config.load()
    download.run(cfg)
    normalize.run(cfg)
    # No models/resnet at all: the params' own seed cannot come from the pipeline and trains here.
    summary = seeds.run(cfg, [0], progress=False)
    assert (paths.CHECKPOINTS / f"resnet-seed0-{seeds.precision_of(cfg)}.pt").exists()
    assert summary["seeds"][0]["seed"] == 0 and summary["std"]["val_acc"] == 0.0


def test_seeds_that_seeds_json_holds_for_this_recipe_are_not_trained_again(project):
    cfg = config.load()
    download.run(cfg)
    normalize.run(cfg)
    precision = seeds.precision_of(cfg)
    held = {"seed": 1, "precision": precision, "machine": "elsewhere", "val_acc": 0.123456, "test_acc": 0.5, "train_running_acc": 0.4, "train_acc": 0.6,
            "selected_epoch": 1, "train_time_s": 9.0}

    def record(recipe: dict) -> None:
        seeds.SEEDS_FILE.parent.mkdir(parents=True, exist_ok=True)
        seeds.SEEDS_FILE.write_text(json.dumps({"recipe": recipe, **seeds.aggregate([held])}))

    record(cfg.train.resnet.without_seed())
    summary = seeds.run(cfg, [1, 2], progress=False)
    assert summary["seeds"][0] == held, "seed 1 is taken from seeds.json as it is"
    assert not (paths.CHECKPOINTS / f"resnet-seed1-{precision}.pt").exists()
    assert (paths.CHECKPOINTS / f"resnet-seed2-{precision}.pt").exists(), "seed 2 is not in seeds.json: it trains"
    assert json.loads(seeds.SEEDS_FILE.read_text())["seeds"][0] == held

    # Held for another recipe, the seed trains.
    record({**cfg.train.resnet.without_seed(), "epochs": cfg.train.resnet.epochs + 1})
    assert seeds.run(cfg, [1], progress=False)["seeds"][0]["val_acc"] != held["val_acc"]
    assert (paths.CHECKPOINTS / f"resnet-seed1-{precision}.pt").exists()

    # --retrain trains it although seeds.json holds it for this recipe.
    record(cfg.train.resnet.without_seed())
    assert seeds.run(cfg, [1], progress=False, retrain=True)["seeds"][0]["val_acc"] != held["val_acc"]


def test_fp32_rows_join_the_bf16_rows_and_the_mean_stays_over_the_pipeline_precision(project):
    cfg = config.load()
    download.run(cfg)
    normalize.run(cfg)
    bf16_rows = [{"seed": s, "precision": "bf16", "machine": "a CPU", "val_acc": v, "test_acc": 0.5,
                  "train_running_acc": 0.4, "train_acc": 0.6, "selected_epoch": 1, "train_time_s": 9.0}
                 for s, v in [(0, 0.70), (1, 0.80)]]
    seeds.SEEDS_FILE.parent.mkdir(parents=True, exist_ok=True)
    seeds.SEEDS_FILE.write_text(json.dumps({"recipe": cfg.train.resnet.without_seed(),
                                            **seeds.aggregate(bf16_rows, "bf16")}))
    (paths.METRICS / "evaluate.json").write_text(json.dumps({"machine": {"precision": "bf16"}}))

    fp32 = config.load(overrides=["train.precision=fp32"])
    summary = seeds.run(fp32, [1], progress=False)

    assert [(r["seed"], r["precision"]) for r in summary["seeds"]] == [(0, "bf16"), (1, "bf16"), (1, "fp32")]
    assert summary["seeds"][:2] == bf16_rows, "the bf16 rows are kept as they were"
    assert (paths.CHECKPOINTS / "resnet-seed1-fp32.pt").exists(), "seed 1 trained again, in fp32"
    assert summary["aggregated_precision"] == "bf16"
    assert summary["mean"]["val_acc"] == pytest.approx(0.75), "the mean is of the bf16 rows only"
    assert json.loads(seeds.SEEDS_FILE.read_text()) == summary
