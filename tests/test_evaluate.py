"""The evaluate stage: before/after figures, report, DVC plots, and the registry alias by the targets."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import config, data, paths, tracking
from pipeline.device import uses_bf16
from pipeline.models import ModelFileError
from pipeline.stages import download, evaluate, normalize, train
from tests.conftest import enter_project, tiny_params

EASY = ["evaluate.targets.val_acc_min=0.0", "evaluate.targets.train_acc_max=1.0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, archive_url, tiny_archive):
    """Both tiny models trained once, the ResNet's model logged; yields the project directory."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        directory = enter_project(tmp_path_factory.mktemp("evaluate"), monkeypatch,
                                  tiny_params(archive_url, tiny_archive[1]))
        cfg = config.load()
        download.run(cfg)
        normalize.run(cfg)
        train.run(cfg, "baseline", progress=False)
        train.run(config.load(overrides=["train.log_model=true"]), "resnet", progress=False)
        yield directory


def test_unmet_targets_register_the_model_without_the_champion_alias(trained):
    metrics = evaluate.run(config.load(overrides=["train.log_model=true"]))
    assert metrics["targets"]["val_acc"] is False  # tiny data and 2 epochs: far below 85%
    assert metrics["all_targets_hold"] is False
    model = MlflowClient().get_registered_model("cifar10-resnet")
    assert "champion" not in model.aliases
    report = (paths.REPORTS / "report.md").read_text()
    assert "❌ missed: validation accuracy > 85%" in report


def test_met_targets_give_the_champion_alias_and_it_predicts(trained):
    metrics = evaluate.run(config.load(overrides=["train.log_model=true", *EASY]))
    assert metrics["all_targets_hold"] is True
    client = MlflowClient()
    version = client.get_model_version_by_alias("cifar10-resnet", "champion")
    assert version.tags["all_targets_hold"] == "true"
    champion = mlflow.pyfunc.load_model("models:/cifar10-resnet@champion")
    images = data.load_split(paths.NORMALIZED, "test").images[:8].astype(np.float32)
    assert np.asarray(champion.predict(images)).shape == (8, 10)


def test_the_parent_run_carries_the_headline_and_spans_the_stages(trained):
    metrics = evaluate.run(config.load(overrides=EASY))
    client = MlflowClient()
    experiment = client.get_experiment_by_name(config.load().train.experiment)
    evaluated = client.search_runs([experiment.experiment_id], "attributes.run_name = 'evaluate'",
                                   order_by=["attributes.start_time DESC"], max_results=1)[0]
    parent = client.get_run(evaluated.data.tags["mlflow.parentRunId"])
    assert parent.data.metrics["resnet/val_acc"] == pytest.approx(metrics["resnet"]["val_acc"])
    assert parent.data.metrics["baseline/train_running_acc"] == pytest.approx(
        metrics["baseline"]["train_running_acc"])
    assert parent.data.tags["all_targets_hold"] == "true"
    assert parent.info.start_time <= evaluated.info.start_time <= parent.info.end_time, \
        "the parent's duration covers its stages"

    # What `python -m pipeline repro` does after DVC: the headline the evaluate stage wrote is not written twice.
    tracking.summarize_parent(parent.info.run_id, {**metrics, "resnet": {**metrics["resnet"], "val_acc": 0.0}},
                              if_missing=True)
    history = client.get_metric_history(parent.info.run_id, "resnet/val_acc")
    assert [m.value for m in history] == [pytest.approx(metrics["resnet"]["val_acc"])]


def test_metrics_hold_before_after_figures_for_both_models(trained):
    evaluate.run(config.load(overrides=EASY))
    metrics = json.loads((paths.METRICS / "evaluate.json").read_text())
    for name in ("baseline", "resnet"):
        figures = metrics[name]
        for key in ("train_acc", "val_acc", "test_acc", "gap", "train_running_acc", "parameters"):
            assert key in figures, (name, key)
        assert figures["gap"] == pytest.approx(figures["train_acc"] - figures["val_acc"])
        assert not any(isinstance(v, (dict, list)) for v in figures.values()), "one figure per key"
    per_class = pd.read_csv(paths.REPORTS / "per_class_test_acc.csv", index_col="class")
    assert list(per_class.index) == data.load_stats(paths.NORMALIZED)["classes"]
    assert list(per_class.columns) == ["baseline", "resnet"]
    assert set(metrics["targets"]) == {"val_acc", "train_running_acc", "epochs", "no_augmentation", "cifar10_only"}
    # Where it was measured, with the precision `auto` chose there: training times depend on both.
    assert metrics["machine"]["device"] == "cpu" and metrics["machine"]["precision"] in ("bf16", "fp32")
    assert metrics["machine"]["precision"] == ("bf16" if uses_bf16("auto", torch.device("cpu")) else "fp32")


def test_confusion_plots_match_the_test_split(trained):
    evaluate.run(config.load(overrides=EASY))
    test = data.load_split(paths.NORMALIZED, "test")
    classes = data.load_stats(paths.NORMALIZED)["classes"]
    metrics = json.loads((paths.METRICS / "evaluate.json").read_text())
    for name in ("baseline", "resnet"):
        frame = pd.read_csv(paths.PLOTS / "evaluate" / f"confusion_{name}.csv")
        assert list(frame.columns) == ["actual", "predicted"]
        assert list(frame["actual"]) == [classes[i] for i in test.labels]
        assert (frame["actual"] == frame["predicted"]).mean() == pytest.approx(metrics[name]["test_acc"])


def test_report_has_the_table_figures_and_target_lines(trained):
    evaluate.run(config.load(overrides=EASY))
    report = (paths.REPORTS / "report.md").read_text()
    for row in ("training accuracy, running (train mode)", "training accuracy, clean (eval mode)",
                "validation accuracy", "test accuracy", "generalization gap", "parameters", "training time"):
        assert row in report
    assert report.count("✅ holds") == 5
    assert (paths.REPORTS / "learning_curves.png").stat().st_size > 10_000
    assert (paths.REPORTS / "confusion_matrices.png").stat().st_size > 10_000


def test_evaluate_run_logs_the_comparison_with_the_training_runs(trained):
    evaluate.run(config.load(overrides=EASY))
    runs = mlflow.search_runs(experiment_names=["cifar10-resnet-vs-cnn"], output_format="list",
                              filter_string="tags.`dvc.stage` = 'evaluate'")
    latest = runs[0]
    resnet_run = json.loads(paths.model_tracking_file("resnet").read_text())["run_id"]
    assert latest.data.tags["resnet.run_id"] == resnet_run
    assert "resnet/val_acc" in latest.data.metrics and "baseline/gap" in latest.data.metrics
    artifacts = {a.path for a in MlflowClient().list_artifacts(latest.info.run_id, "report")}
    assert "report/report.md" in artifacts


def test_a_missing_model_is_a_clear_error(trained):
    saved = paths.model_file("baseline").read_bytes()
    paths.model_file("baseline").unlink()
    try:
        with pytest.raises(ModelFileError, match=r"models/baseline/model.pt not found.*dvc repro train_baseline"):
            evaluate.run(config.load())
    finally:
        paths.model_file("baseline").write_bytes(saved)


def test_a_model_trained_with_other_params_is_a_clear_error(trained):
    with pytest.raises(ModelFileError, match=r"models/resnet/model.pt was trained with another model config"):
        evaluate.run(config.load(overrides=["train.resnet.model.width=8"]))
    with pytest.raises(ModelFileError, match=r"trained with other params .*train.resnet"):
        evaluate.run(config.load(overrides=["train.resnet.optimizer.lr=0.2"]))


def _corrupt_weights(path) -> None:
    saved = torch.load(path, weights_only=True)
    saved["state_dict"] = {key: value.reshape(-1)[:1] for key, value in saved["state_dict"].items()}
    torch.save(saved, path)


CORRUPT = {
    "model_garbage": (lambda: paths.model_file("resnet"), lambda p: p.write_bytes(b"\x00not a model" * 50),
                      "does not load as plain tensors"),
    "model_not_a_dict": (lambda: paths.model_file("resnet"), lambda p: torch.save([1, 2, 3], p),
                         "no model config and weights"),
    "model_weights_misfit": (lambda: paths.model_file("resnet"), _corrupt_weights, "weights do not fit the model"),
    "metrics_garbage": (lambda: paths.metrics_file("resnet"), lambda p: p.write_text("{not json"),
                        "not the JSON object"),
    "tracking_a_list": (lambda: paths.model_tracking_file("resnet"), lambda p: p.write_text("[1, 2]"),
                        "not the JSON object"),
    "history_garbage": (lambda: paths.history_file("resnet"), lambda p: p.write_bytes(b"\xff\xfe\x00garbage"),
                        "not the training's history"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_a_corrupt_training_output_is_a_clear_error_naming_the_file(trained, case):
    where, corrupt, phrase = CORRUPT[case]
    path = where()
    saved = path.read_bytes()
    try:
        corrupt(path)
        with pytest.raises(ModelFileError, match=phrase) as info:
            evaluate.run(config.load())
        assert str(path) in str(info.value) and "dvc repro train_resnet" in str(info.value)
    finally:
        path.write_bytes(saved)
