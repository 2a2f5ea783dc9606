"""MLflow records of a training stage, read back from a real sqlite tracking store."""

from __future__ import annotations

import json
import time

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import config, data, models, paths, tracking
from pipeline.stages import download, normalize, train
from pipeline.device import uses_bf16
from tests.conftest import enter_project, tiny_params


@pytest.fixture(scope="module")
def trained_resnet(tmp_path_factory, archive_url, tiny_archive):
    """The tiny pipeline up to a ResNet trained for 3 epochs with its model logged (~10 s for torch.export)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        enter_project(tmp_path_factory.mktemp("tracking"), monkeypatch, tiny_params(archive_url, tiny_archive[1]))
        cfg = config.load(overrides=["train.log_model=true", "train.resnet.epochs=3"])
        download.run(cfg)
        normalize.run(cfg)
        summary = train.run(cfg, "resnet", progress=False)
        tracked = json.loads(paths.model_tracking_file("resnet").read_text())
        yield cfg, summary, tracked, MlflowClient().get_run(tracked["run_id"])


def test_run_records_params_flattened(trained_resnet):
    cfg, _, _, run = trained_resnet
    params = run.data.params
    # The recipe without the train.resnet. prefix: both models' runs line up in MLflow's Compare runs.
    assert params["epochs"] == "3"
    assert params["model.blocks"] == str(cfg.train.resnet.model.blocks)
    assert params["optimizer.name"] == "sgd"
    assert params["data.md5"] == cfg.data.md5
    assert params["train.eval_train_size"] == "0"
    assert not any(key.startswith(("baseline.", "resnet.", "train.baseline", "train.resnet")) for key in params)
    assert "model.widths" not in params, "the ResNet run holds only its own model's recipe"


def test_every_epoch_metric_has_one_point_per_epoch(trained_resnet):
    _, summary, tracked, run = trained_resnet
    client = MlflowClient()
    for key in ("loss/train_running", "accuracy/train_running", "accuracy/train_clean", "loss/val", "accuracy/val",
                "optimizer/lr", "speed/epoch_time_s", "speed/images_per_s"):
        history = client.get_metric_history(tracked["run_id"], key)
        assert sorted(m.step for m in history) == [1, 2, 3], key
    assert run.data.metrics["selected/val_acc"] == pytest.approx(summary["val_acc"])
    assert run.data.tags["selected_epoch"] == str(summary["selected_epoch"])
    # Counts and choices are tags and params, not charts: the chart page opens on measurements.
    assert not {"epoch", "epochs", "parameters", "selected_epoch"} & {key.split("/")[-1] for key in run.data.metrics}
    assert run.data.tags["parameters"] == str(summary["parameters"])


def test_run_is_tagged_with_provenance(trained_resnet):
    cfg, _, _, run = trained_resnet
    stats = data.load_stats(paths.NORMALIZED)
    tags = run.data.tags
    assert tags["dvc.stage"] == "train_resnet"
    assert tags["model"] == "resnet"
    assert tags["data.archive_md5"] == cfg.data.md5 == stats["archive_md5"]
    assert tags["data.norm_mean"] == ",".join(f"{v:.4f}" for v in stats["mean"])
    assert tags["torch.version"] == torch.__version__
    assert tags["device"] == "cpu"
    assert tags["precision"] == ("bf16" if uses_bf16(cfg.train.precision, torch.device("cpu")) else "fp32")
    assert {"git.dirty", tracking.GROUP_TAG, "select"} <= set(tags)
    assert run.info.run_name == "resnet"


def test_run_is_nested_under_the_group_parent(trained_resnet):
    cfg, _, _, run = trained_resnet
    parent_id = run.data.tags["mlflow.parentRunId"]
    parent = MlflowClient().get_run(parent_id)
    assert parent.data.tags[tracking.PARENT_TAG] == "true"
    assert parent.data.tags[tracking.GROUP_TAG] == run.data.tags[tracking.GROUP_TAG]
    assert tracking.parent_run(cfg) == parent_id, "the same params find the same parent"


def test_the_experiment_opens_as_a_model_training_experiment(trained_resnet):
    _, _, _, run = trained_resnet
    experiment = MlflowClient().get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not MLflow 3's GenAI pages


def test_train_and_validation_datasets_are_inputs(trained_resnet):
    _, _, _, run = trained_resnet
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"cifar10-train", "cifar10-val"}
    contexts = {name: {t.value for t in d.tags if t.key == "mlflow.data.context"} for name, d in inputs.items()}
    assert contexts == {"cifar10-train": {"training"}, "cifar10-val": {"validation"}}


def test_logged_model_loads_and_predicts_like_the_saved_weights(trained_resnet):
    cfg, _, tracked, _ = trained_resnet
    model, _ = models.load(paths.model_file("resnet"), cfg.train.resnet.model, "train_resnet")
    images = data.load_split(paths.NORMALIZED, "test").images[:16].astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()

    torch_model = mlflow.pytorch.load_model(tracked["model_uri"], map_location="cpu")
    with torch.no_grad():
        np.testing.assert_allclose(torch_model(torch.from_numpy(images)).numpy(), expected, rtol=1e-4, atol=1e-4)
    pyfunc = mlflow.pyfunc.load_model(tracked["model_uri"])
    np.testing.assert_allclose(np.asarray(pyfunc.predict(images)), expected, rtol=1e-4, atol=1e-4)


def test_history_and_learning_curve_are_artifacts(trained_resnet):
    _, _, tracked, _ = trained_resnet
    names = {a.path for a in MlflowClient().list_artifacts(tracked["run_id"])}
    assert {"history.csv", "learning_curves.png"} <= names


def test_a_stage_run_with_system_metrics_records_them(project, monkeypatch):
    # What a training stage on a GPU asks for; sampled every second here instead of every ten.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    with tracking.stage_run(config.load(), "train_resnet", run_name="resnet", system_metrics=True) as run:
        deadline = time.monotonic() + 60  # the sampling thread may lag on a busy machine
        while time.monotonic() < deadline:
            recorded = MlflowClient().get_run(run.info.run_id).data.metrics
            if any(key.startswith("system/cpu_utilization") for key in recorded):
                break
            time.sleep(0.5)
    assert any(key.startswith("system/cpu_utilization") for key in recorded), sorted(recorded)
