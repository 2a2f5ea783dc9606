"""pipeline/train.py and the train stage: learning, selection rules, optimizers and schedules,
determinism, the stage's outputs, and resuming a killed run from its checkpoint.

Real PyTorch on small data. The models are tiny, so torch runs on one thread here: on a shared
2-core machine the thread hand-offs of a second thread cost more than the arithmetic.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import config, models, paths
from pipeline.config import Recipe, TrainSection
from pipeline.data import Split, load_split
from pipeline.stages import download, normalize
from pipeline.stages import train as train_stage
from pipeline.device import uses_bf16
from pipeline import train as train_module
from pipeline.train import (CHECKPOINT_VERSION, Checkpoint, Selection, batches, fit, make_optimizer, make_schedule,
                            parameter_groups, train_step,
                            weight_average)
from pipeline.scoring import predict, score
from pipeline.compute import training_flops
from tests.conftest import ROOT, enter_project, tiny_params

TIMING = ("epoch_time_s", "images_per_s")  # the only fields allowed to differ between identical runs
HISTORY_COLUMNS = ["epoch", "train_running_loss", "train_running_acc", "train_clean_subset_acc", "val_loss", "val_acc", "lr",
                   "epoch_time_s", "images_per_s"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- synthetic, learnable data ----------------------------------------------------------------

_rng = np.random.default_rng(123)
# Each class has a spatial pattern (which the baseline's dense head picks up) and a mean colour
# (which survives the ResNet's global average pooling).
CLASS_MEANS = 0.7 * _rng.normal(0, 1, (10, 3, 32, 32)) + _rng.normal(0, 1, (10, 3, 1, 1))


def learnable(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10)
    images = CLASS_MEANS[labels] + rng.normal(0, 1, (n, 3, 32, 32))
    return Split(images.astype(np.float16), labels.astype(np.int64))  # as the normalize stage stores them


TRAIN, VAL = learnable(300, 1), learnable(200, 2)
SMALL_TRAIN, SMALL_VAL = learnable(64, 3), learnable(40, 4)

BASELINE = {"arch": "baseline", "widths": [8], "hidden": 32}
RESNET = {"arch": "resnet", "width": 8, "blocks": [1]}


def settings(**values) -> TrainSection:
    # fp32: the exact premises below must not depend on whether the machine's CPU has native bf16.
    return TrainSection.model_validate({
        "experiment": "tests", "device": "cpu", "precision": "fp32", "eval_train_size": 0, "eval_batch_size": 256,
        "log_model": False, "baseline": train_config().model_dump(), "resnet": train_config(model=RESNET).model_dump(),
        **values,
    })


def train_config(**values) -> Recipe:
    return Recipe.model_validate({
        "model": BASELINE, "epochs": 4, "batch_size": 32, "optimizer": {"name": "adam", "lr": 0.003}, "seed": 0,
        **values,
    })


def run_fit(tmp_path: Path, cfg: Recipe, train: Split = TRAIN, val: Split = VAL, **kwargs):
    return fit(cfg, settings(), train, val, Checkpoint(tmp_path / "checkpoint.pt", "fingerprint"), progress=False,
               **kwargs)


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def val_accuracy(model: torch.nn.Module, split: Split = VAL, bf16: bool = False) -> float:
    logits = predict(model, torch.from_numpy(split.images).float(), 256, bf16)
    return score(logits, torch.from_numpy(split.labels))[1]


def first_argmax(values: list[float]) -> int:
    return values.index(max(values))


# --- learning ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model,epochs,optimizer,min_val_acc", [
    (BASELINE, 3, {"name": "adam", "lr": 0.003}, 0.8),
    (RESNET, 6, {"name": "adam", "lr": 0.02}, 0.7),
], ids=["baseline", "resnet"])
def test_training_lowers_the_loss_and_learns_the_classes(tmp_path, model, epochs, optimizer, min_val_acc):
    """Chance is 10%; over seeds 0-7 the baseline reached 100% and the ResNet 90% or more."""
    result = run_fit(tmp_path, train_config(model=model, epochs=epochs, optimizer=optimizer, select="last"))
    losses = [r["train_running_loss"] for r in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.history[-1]["val_acc"] > min_val_acc
    assert result.history[-1]["train_clean_subset_acc"] > min_val_acc
    assert val_accuracy(result.model) == pytest.approx(result.history[-1]["val_acc"])


def test_without_a_terminal_training_prints_plain_progress_lines(tmp_path, monkeypatch, capsys):
    # pytest's captured stderr is not a terminal, as under DVC: tqdm would draw nothing there.
    monkeypatch.setattr(train_module, "PROGRESS_LINE_EVERY_S", 0.0)
    fit(train_config(epochs=1), settings(), TRAIN, VAL, Checkpoint(tmp_path / "checkpoint.pt", "fingerprint"),
        progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if "img/s" in line]
    steps = len(batches(len(TRAIN.labels), 32, 0, 1))
    assert len(lines) == steps, "one line per step when the interval is zero"
    assert lines[-1].strip().startswith(f"epoch 1/1: batch {steps}/{steps},") and "about 0 s left" in lines[-1]


def test_without_progress_nothing_is_printed_per_batch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_module, "PROGRESS_LINE_EVERY_S", 0.0)
    run_fit(tmp_path, train_config(epochs=1))
    assert "img/s, about" not in capsys.readouterr().err


def test_history_has_one_full_record_per_epoch(tmp_path):
    result = run_fit(tmp_path, train_config(epochs=2), SMALL_TRAIN, SMALL_VAL)
    assert [r["epoch"] for r in result.history] == [1, 2]
    for record in result.history:
        assert set(HISTORY_COLUMNS) | {"train_clean_subset_loss"} == set(record)
        assert all(math.isfinite(v) for v in record.values())
        assert 0.0 <= record["train_running_acc"] <= 1.0 and 0.0 <= record["val_acc"] <= 1.0
        assert record["epoch_time_s"] > 0 and record["images_per_s"] > 0


# --- selection rules --------------------------------------------------------------------------

def test_select_last_picks_the_last_epoch(tmp_path):
    result = run_fit(tmp_path, train_config(select="last"))
    assert result.selected_epoch == 4
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert final["complete"] and final["epoch"] == 4
    assert all(torch.equal(result.state[k], final["model"][k]) for k in final["model"])


def test_best_val_under_target_skips_epochs_at_or_over_the_train_acc_bound(tmp_path):
    history = run_fit(tmp_path, train_config(select="last")).history
    best = first_argmax([r["val_acc"] for r in history]) + 1
    # The bound excludes the best epoch itself: the rule must pick another one.
    bound = history[best - 1]["train_running_acc"]
    allowed = [r for r in history if r["train_running_acc"] < bound]
    assert allowed, "premise: some epoch trains below the bound"
    expected = max(allowed, key=lambda r: (r["val_acc"], -r["epoch"]))["epoch"]
    assert expected != best, "premise: the bound changes the choice"

    result = run_fit(tmp_path, train_config(select="best_val_under_target", select_train_acc_max=bound))
    assert without_timing(result.history) == without_timing(history)
    assert result.selected_epoch == expected
    assert result.history[result.selected_epoch - 1]["train_running_acc"] < bound
    assert val_accuracy(result.model) == pytest.approx(history[expected - 1]["val_acc"])


def test_selection_keeps_the_best_validation_epoch_the_rule_admits():
    scored = torch.nn.Linear(2, 2)
    records = [{"epoch": 1, "train_running_acc": 0.50, "val_acc": 0.60}, {"epoch": 2, "train_running_acc": 0.80, "val_acc": 0.70},
               {"epoch": 3, "train_running_acc": 0.95, "val_acc": 0.90}, {"epoch": 4, "train_running_acc": 0.85, "val_acc": 0.65}]
    kept = {}
    for rule in ("last", "best_val_under_target"):
        selection = Selection(rule, train_acc_max=0.9)
        for record in records:
            selection.consider(record, scored)
        kept[rule] = selection.epoch
    assert kept == {"last": 4, "best_val_under_target": 2}, "epoch 3 validates best but trains over the bound"


def test_best_val_under_target_falls_back_to_the_last_epoch(tmp_path, capsys):
    last = run_fit(tmp_path, train_config(select="last"))
    assert min(r["train_running_acc"] for r in last.history) >= 0.01, "premise: no epoch trains below the bound"

    result = run_fit(tmp_path, train_config(select="best_val_under_target", select_train_acc_max=0.01))
    assert result.selected_epoch == 4
    assert "no epoch had running training accuracy < 0.01: selecting the last epoch" in capsys.readouterr().out
    assert all(torch.equal(result.state[k], last.state[k]) for k in last.state)


# --- optimizers, schedules, EMA ---------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["constant", "onecycle"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_optimizer_and_schedule_trains(tmp_path, optimizer, schedule):
    lr = 0.05 if optimizer == "sgd" else 0.003
    cfg = train_config(model=RESNET, epochs=2, batch_size=8, schedule=schedule,
                       optimizer={"name": optimizer, "lr": lr, "weight_decay": 1e-4})
    result = run_fit(tmp_path, cfg, SMALL_TRAIN, SMALL_VAL)
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert all(math.isfinite(r["train_running_loss"]) and math.isfinite(r["val_loss"]) for r in result.history)
    torch.manual_seed(cfg.seed)
    initial = models.build_model(cfg.model).state_dict()  # what fit starts from
    assert any(not torch.equal(result.state[k], initial[k]) for k in initial if initial[k].is_floating_point())
    lrs = [r["lr"] for r in result.history]
    if schedule == "constant":
        assert lrs == [pytest.approx(lr)] * 2
    else:  # annealed towards zero by the last step
        assert lrs[-1] < 0.1 * lr and max(lrs) <= lr * (1 + 1e-9)


def test_make_optimizer_builds_the_named_optimizer():
    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = make_optimizer(train_config(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}), params)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    no_momentum = make_optimizer(train_config(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0, "nesterov": True}),
                                 params)
    assert not no_momentum.defaults["nesterov"], "nesterov needs momentum: dropped rather than an error"
    adam = make_optimizer(train_config(optimizer={"name": "adam", "lr": 0.002}), params)
    assert type(adam) is torch.optim.Adam and adam.defaults["lr"] == 0.002


def scheduled_rates(cfg: Recipe, steps: int) -> list[float]:
    """The learning rate of each of `steps` optimizer steps under cfg's schedule."""
    optimizer = make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
    schedule = make_schedule(cfg, optimizer, total_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_onecycle_lr_peaks_at_the_optimizer_lr():
    lrs = scheduled_rates(train_config(schedule="onecycle", warmup_fraction=0.3, optimizer={"name": "sgd", "lr": 0.2}),
                          100)
    assert max(lrs) == pytest.approx(0.2)
    assert 25 <= first_argmax(lrs) <= 32, "the peak ends the warmup (30% of the steps)"
    assert lrs[0] == pytest.approx(0.2 / 25) and lrs[-1] < 1e-3 * 0.2


def test_a_schedule_planned_longer_than_the_run_stops_part_way_down_its_curve(tmp_path):
    planned = train_config(schedule="onecycle", optimizer={"name": "sgd", "lr": 0.2}, epochs=2, schedule_epochs=4)
    whole = scheduled_rates(planned, 4 * 10)
    result = run_fit(tmp_path, planned, train=learnable(320, 0))  # 10 batches of 32 per epoch
    assert [r["lr"] for r in result.history] == pytest.approx([whole[9], whole[19]])
    assert result.history[-1]["lr"] > 0.5 * 0.2, "stopped at half the plan, the rate is still high"


def test_a_final_lr_fraction_ends_the_schedule_at_that_fraction_of_the_peak():
    lrs = scheduled_rates(train_config(schedule="onecycle", final_lr_fraction=0.15,
                                       optimizer={"name": "sgd", "lr": 0.2}), 100)
    assert max(lrs) == pytest.approx(0.2)
    assert lrs[-1] == pytest.approx(0.15 * 0.2, rel=0.02) and min(lrs[first_argmax(lrs):]) >= 0.15 * 0.2 - 1e-9


def test_onecycle_with_a_one_step_warm_up_runs():
    # 5 steps and warm-up 0.2: the warm-up is exactly one step, where OneCycleLR alone divides by zero.
    lrs = scheduled_rates(train_config(schedule="onecycle", warmup_fraction=0.2, optimizer={"name": "sgd", "lr": 0.2}), 5)
    assert lrs[0] == pytest.approx(0.2, rel=0.1) and lrs == sorted(lrs, reverse=True)


def test_a_constant_schedule_keeps_the_rate():
    assert scheduled_rates(train_config(schedule="constant", optimizer={"name": "sgd", "lr": 0.2}), 50) == \
        [pytest.approx(0.2)] * 50


def test_weight_average_warms_up_then_averages_with_its_decay():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = weight_average(model, decay=0.99)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(1)  # weights, bias, running statistics and the batch count

    average.update_parameters(model)  # first update: decay 2/11, so the average moves most of the way at once
    first = 2 / 11
    for key, value in average.module.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, first * start[key] + (1 - first)), key
        else:
            assert value.item() == 1, "counters are copied, not averaged"

    average.n_averaged.fill_(10_000)  # far past the warm-up: the configured decay holds
    before = average.module.state_dict()["0.weight"].clone()
    average.update_parameters(model)
    assert torch.allclose(average.module.state_dict()["0.weight"], 0.99 * before + 0.01)
    assert all(not p.requires_grad for p in average.parameters())


def test_weight_average_computes_what_the_hand_written_ema_it_replaced_did_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 8)
    average = weight_average(model, decay=0.995)
    reference = [t.clone() for t in model.state_dict().values()]
    for step in range(1, 400):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update_parameters(model)
        decay = min(0.995, (1 + step) / (10 + step))  # the former EMA class, verbatim
        torch._foreach_lerp_(reference, list(model.state_dict().values()), 1.0 - decay)
    assert all(torch.equal(a, r) for a, r in zip(average.module.state_dict().values(), reference))


def test_ema_weights_are_the_ones_evaluated_and_selected(tmp_path):
    model = {**RESNET, "dropout": 0.1, "head_dropout": 0.1}
    result = run_fit(tmp_path, train_config(model=model, epochs=2, ema_decay=0.9, optimizer={"name": "sgd", "lr": 0.05}),
                     SMALL_TRAIN, SMALL_VAL)
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert final["average"] is not None
    averaged = {k.removeprefix("module."): v for k, v in final["average"].items() if k.startswith("module.")}
    assert set(averaged) == set(result.state)
    assert all(torch.equal(result.state[k], averaged[k]) for k in averaged), "the selected weights are the EMA's"
    assert any(not torch.equal(averaged[k], final["model"][k]) for k in averaged if averaged[k].is_floating_point())
    assert val_accuracy(result.model, SMALL_VAL) == pytest.approx(result.history[-1]["val_acc"])


def test_compiled_training_step_learns_like_the_eager_one(tmp_path):
    cfg = train_config(epochs=2)
    eager = fit(cfg, settings(), SMALL_TRAIN, SMALL_VAL, Checkpoint(tmp_path / "eager.pt", "f"), progress=False)
    compiled = fit(cfg, settings(compile=True), SMALL_TRAIN, SMALL_VAL, Checkpoint(tmp_path / "compiled.pt", "f"),
                   progress=False)
    # Inductor fuses and reorders float arithmetic: close, not bit-identical.
    for ours, theirs in zip(eager.history, compiled.history):
        assert theirs["train_running_loss"] == pytest.approx(ours["train_running_loss"], rel=1e-3)
        assert theirs["val_loss"] == pytest.approx(ours["val_loss"], rel=1e-3)


# --- precision --------------------------------------------------------------------------------

@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
def test_train_step_computes_in_the_asked_precision(bf16):
    model = models.build_model(config.ResNetModelConfig.model_validate(RESNET))
    optimizer = make_optimizer(train_config(), model.parameters())
    images, labels = torch.from_numpy(SMALL_TRAIN.images[:8]).float(), torch.from_numpy(SMALL_TRAIN.labels[:8])
    logits, loss = train_step(model, torch.nn.CrossEntropyLoss(), optimizer, images, labels, bf16)
    assert logits.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert loss.dtype == torch.float32  # autocast computes the loss in fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32


def test_bf16_training_learns_and_is_scored_in_bf16(tmp_path):
    cfg = train_config(model=RESNET, epochs=6, optimizer={"name": "adam", "lr": 0.02}, select="last")
    result = fit(cfg, settings(precision="bf16"), TRAIN, VAL, Checkpoint(tmp_path / "checkpoint.pt", "f"),
                 progress=False)
    assert result.precision == "bf16"
    assert result.history[-1]["train_running_loss"] < 0.5 * result.history[0]["train_running_loss"]
    assert result.history[-1]["val_acc"] > 0.7
    assert val_accuracy(result.model, VAL, bf16=True) == pytest.approx(result.history[-1]["val_acc"])


# --- determinism and data order ---------------------------------------------------------------

def test_same_seed_gives_the_same_history(tmp_path):
    model = {**RESNET, "dropout": 0.2, "head_dropout": 0.3, "blocks": [1, 1]}
    cfg = train_config(model=model, epochs=2, optimizer={"name": "sgd", "lr": 0.05}, schedule="onecycle")
    first = run_fit(tmp_path, cfg, SMALL_TRAIN, SMALL_VAL)
    second = run_fit(tmp_path, cfg, SMALL_TRAIN, SMALL_VAL)
    assert without_timing(first.history) == without_timing(second.history)
    assert all(torch.equal(first.state[k], second.state[k]) for k in first.state)

    other = run_fit(tmp_path, cfg.model_copy(update={"seed": 1}), SMALL_TRAIN, SMALL_VAL)
    assert without_timing(other.history) != without_timing(first.history), "the seed matters"


@pytest.mark.parametrize("n,batch_size", [(100, 10), (103, 10), (101, 10), (7, 32), (65, 32)])
def test_batches_cover_each_index_once_per_epoch(n, batch_size):
    for epoch in (1, 2, 3):
        chunks = batches(n, batch_size, seed=5, epoch=epoch)
        seen = torch.cat(chunks).tolist()
        assert len(seen) == len(set(seen)), "no index twice"
        assert set(seen) <= set(range(n))
        missing = n - len(seen)
        # Only a single-image tail is dropped (batch norm cannot train on one image).
        assert missing == (1 if n % batch_size == 1 and n > batch_size else 0)
        assert all(len(c) == batch_size for c in chunks[:-1]) and 2 <= len(chunks[-1]) <= batch_size


def test_batches_depend_only_on_seed_and_epoch():
    def order(seed, epoch):
        return torch.cat(batches(500, 64, seed, epoch)).tolist()

    assert order(3, 1) == order(3, 1)
    assert order(3, 1) != order(3, 2), "each epoch is shuffled anew"
    assert order(3, 1) != order(4, 1)
    torch.manual_seed(0)
    before = order(3, 7)
    torch.rand(100)  # the global generator (dropout) does not move the order
    assert order(3, 7) == before
    assert sorted(order(3, 1)) == list(range(500))


# --- the train stage --------------------------------------------------------------------------

def prepare(directory: Path, monkeypatch, params: dict) -> config.Config:
    """A project directory with the download and normalize stages run; returns its config."""
    directory.mkdir(parents=True, exist_ok=True)
    enter_project(directory, monkeypatch, params)
    cfg = config.load()
    download.run(cfg)
    normalize.run(cfg)
    return cfg


@pytest.mark.parametrize("name", ["baseline", "resnet"])
def test_train_stage_writes_model_metrics_and_history(project, name):
    cfg = config.load()
    download.run(cfg)
    normalize.run(cfg)
    summary = train_stage.run(cfg, name, progress=False)
    train_cfg = getattr(cfg.train, name)

    model, saved = models.load(paths.model_file(name), train_cfg.model, f"train_{name}")
    assert saved["fingerprint"] == cfg.model_fingerprint(name)
    assert saved["selected_epoch"] == summary["selected_epoch"]

    metrics = json.loads(paths.metrics_file(name).read_text())
    assert metrics == summary
    assert {"selected_epoch", "epochs", "select", "train_running_acc", "train_clean_subset_acc", "val_acc", "val_loss",
            "train_running_loss", "train_time_s", "images_per_s", "parameters"} <= set(metrics)
    assert metrics["epochs"] == train_cfg.epochs == 2 and metrics["select"] == train_cfg.select
    assert metrics["parameters"] == models.count_parameters(model)

    history = pd.read_csv(paths.history_file(name))
    assert set(HISTORY_COLUMNS) <= set(history.columns)
    assert history["epoch"].tolist() == [1, 2]
    chosen = history.loc[history["epoch"] == metrics["selected_epoch"]].iloc[0]
    for key in ("train_running_acc", "train_clean_subset_acc", "val_acc", "val_loss", "train_running_loss"):
        assert metrics[key] == pytest.approx(chosen[key]), key
    assert metrics["train_time_s"] == pytest.approx(history["epoch_time_s"].sum())

    bf16 = uses_bf16(cfg.train.precision, torch.device("cpu"))  # as the stage scored it
    assert val_accuracy(model, load_split(paths.NORMALIZED, "val"), bf16) == pytest.approx(metrics["val_acc"])
    tracked = json.loads(paths.model_tracking_file(name).read_text())
    assert tracked["run_id"] and tracked["model_uri"] is None  # log_model is off in the tiny params


def test_fingerprint_follows_what_changes_the_trained_model(project):
    cfg = config.load()
    key = cfg.model_fingerprint("resnet")
    for changed in ("train.precision=bf16", "train.precision=fp32", "train.resnet.seed=1", "data.seed=1"):
        assert config.load(overrides=[changed]).model_fingerprint("resnet") != key, changed
    for unrelated in ("train.experiment=other", "train.baseline.epochs=1", "train.log_model=true"):
        assert config.load(overrides=[unrelated]).model_fingerprint("resnet") == key, unrelated


class Interrupted(Exception):
    pass


def baseline_stopped_in_epoch_two(cfg, run_id: str | None = None) -> Path:
    """The data in place and the baseline's training stopped in epoch 2, before it is checkpointed (as if
    killed there): its checkpoint holds epoch 1. Returns the checkpoint's path."""
    download.run(cfg)
    normalize.run(cfg)
    checkpoint = paths.checkpoint_file("baseline")

    def stop_in_epoch_two(record):
        if record["epoch"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(cfg.train.baseline, cfg.train, load_split(paths.NORMALIZED, "train"), load_split(paths.NORMALIZED, "val"),
            Checkpoint(checkpoint, cfg.model_fingerprint("baseline"), run_id=run_id), on_epoch=stop_in_epoch_two,
            progress=False)
    return checkpoint


def test_the_stage_first_says_what_it_trains_and_about_how_long_it_takes_here(project, capsys):
    cfg = config.load()
    download.run(cfg)
    normalize.run(cfg)
    capsys.readouterr()
    train_stage.run(cfg, "resnet", progress=False)
    first = capsys.readouterr().out.splitlines()[0]
    recipe = cfg.train.resnet
    match = re.fullmatch(rf"train_resnet: {recipe.epochs} epochs of ([\d,]+) images at batch {recipe.batch_size} on "
                         r"cpu \((bf16|fp32)\), (\S+) training FLOPs: about (\d+) min here \((\d+) img/s measured "
                         r"just now\)", first)
    assert match, first
    train_images = int(match[1].replace(",", ""))
    assert train_images == len(load_split(paths.NORMALIZED, "train").labels)
    assert float(match[3]) == pytest.approx(training_flops(recipe, train_images), rel=1e-2)
    assert int(match[5]) > 0


def test_checkpoint_of_other_params_is_ignored(project, capsys):
    cfg = config.load()
    name = "baseline"
    old_key = cfg.model_fingerprint(name)
    checkpoint = baseline_stopped_in_epoch_two(cfg, run_id="run-of-other-params")
    assert Checkpoint(checkpoint, old_key).load()["epoch"] == 1, "premise: the same params would resume"

    new = config.load(overrides=["train.baseline.optimizer.lr=0.002"])
    new_key = new.model_fingerprint(name)
    assert new_key != old_key
    capsys.readouterr()
    train_stage.run(new, name, progress=False)
    out = capsys.readouterr().out
    assert f"checkpoint {checkpoint} is from other params; training from scratch" in out
    assert "resuming" not in out
    assert pd.read_csv(paths.history_file(name))["epoch"].tolist() == [1, 2]
    assert json.loads(paths.model_tracking_file(name).read_text())["run_id"] != "run-of-other-params"
    final = torch.load(checkpoint, weights_only=False)
    assert final["fingerprint"] == new_key and final["complete"]
    assert Checkpoint(checkpoint, new_key).load() is None, "a finished run is not resumed"


# --- resuming a killed run --------------------------------------------------------------------

EPOCHS = 8


def start_training(directory: Path, name: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{directory / 'mlflow.db'}", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    log = open(directory / "train.log", "a")
    try:
        return subprocess.Popen([sys.executable, "-m", "pipeline", "train", name, "--no-progress"], cwd=directory,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def finish(process: subprocess.Popen, directory: Path, timeout: float = 240) -> str:
    try:
        process.wait(timeout=timeout)
    finally:
        process.kill()
    log = (directory / "train.log").read_text()
    assert process.returncode == 0, log
    return log


def read_checkpoint(path: Path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # not there yet, or caught mid-write
        return None


def comparable_outputs(directory: Path, name: str) -> tuple[dict, pd.DataFrame, dict]:
    metrics = json.loads((directory / paths.metrics_file(name)).read_text())
    history = pd.read_csv(directory / paths.history_file(name))
    weights = torch.load(directory / paths.model_file(name), weights_only=True)["state_dict"]
    return ({k: v for k, v in metrics.items() if k not in ("train_time_s", "images_per_s")},
            history.drop(columns=list(TIMING)), weights)


def test_killed_run_resumes_to_the_same_result_and_mlflow_run(tmp_path, monkeypatch, archive_url, tiny_archive):
    name = "resnet"
    params = tiny_params(archive_url, tiny_archive[1])
    # Wider than the tiny default, so that an epoch takes long enough to be interrupted; dropout, onecycle
    # and the EMA (with its warm-up count) make the result depend on the restored RNG, schedule and
    # averaged weights.
    params["train"][name].update(
        model={"arch": "resnet", "width": 16, "blocks": [1, 1], "dropout": 0.1, "head_dropout": 0.2},
        epochs=EPOCHS, schedule="onecycle", ema_decay=0.99)
    killed, intact = tmp_path / "killed", tmp_path / "intact"
    prepare(killed, monkeypatch, params)
    intact.mkdir()
    shutil.copy(killed / "params.yaml", intact / "params.yaml")
    shutil.copytree(killed / paths.NORMALIZED, intact / paths.NORMALIZED)
    monkeypatch.chdir(tmp_path)

    uninterrupted = start_training(intact, name)  # the reference, alongside on the second core
    victim = start_training(killed, name)
    checkpoint = killed / paths.checkpoint_file(name)
    deadline = time.monotonic() + 240
    try:
        while True:
            assert victim.poll() is None, "training ended before it could be interrupted:\n" + \
                (killed / "train.log").read_text()
            state = read_checkpoint(checkpoint)
            if state is not None and state["epoch"] >= 2:
                break
            assert time.monotonic() < deadline, "no checkpoint of epoch 2 in time"
            time.sleep(0.02)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    assert victim.returncode == -signal.SIGKILL
    state = read_checkpoint(checkpoint)  # the last one written before the kill
    assert 2 <= state["epoch"] < EPOCHS and not state["complete"]
    assert state["run_id"]

    killed_log = (killed / "train.log").read_text()
    resumed_log = finish(start_training(killed, name), killed)[len(killed_log):]
    finish(uninterrupted, intact)

    assert f"resuming from {paths.checkpoint_file(name)} after epoch {state['epoch']} of {EPOCHS}" in resumed_log
    left = EPOCHS - state["epoch"]
    assert f"train_{name}: {EPOCHS} epochs ({state['epoch']} done: {left} to go)" in resumed_log
    assert f"epoch {state['epoch']:2d}/{EPOCHS}" not in resumed_log, "finished epochs are not trained again"
    assert f"epoch {EPOCHS:2d}/{EPOCHS}" in resumed_log

    metrics, history, weights = comparable_outputs(killed, name)
    ref_metrics, ref_history, ref_weights = comparable_outputs(intact, name)
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    pd.testing.assert_frame_equal(history, ref_history, check_exact=True)
    assert metrics == ref_metrics
    assert set(weights) == set(ref_weights) and all(torch.equal(weights[k], ref_weights[k]) for k in weights)

    tracked = json.loads((killed / paths.model_tracking_file(name)).read_text())
    assert tracked["run_id"] == state["run_id"], "the resumed run continues the killed run's MLflow run"


class _RunsCode:
    """Unpickled without restrictions, it creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_set_aside_without_running_it(tmp_path, capsys):
    marker = tmp_path / "marker"
    path = tmp_path / "checkpoint.pt"
    torch.save({"version": CHECKPOINT_VERSION, "fingerprint": "f", "payload": _RunsCode(marker)}, path)
    assert Checkpoint(path, "f").load() is None
    assert not marker.exists(), "loading the checkpoint ran code from it"
    out = capsys.readouterr().out
    assert f"checkpoint {path} set aside as checkpoint.pt.rejected: it does not load as plain tensors" in out
    assert "(UnpicklingError)" in out and "could run code" in out and "weights_only" not in out
    assert not path.exists() and path.with_name("checkpoint.pt.rejected").exists()


def test_an_empty_checkpoint_is_set_aside_naming_the_error(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"")
    assert Checkpoint(path, "f").load() is None
    assert re.search(r"does not load as plain tensors and values \(\w+Error\)", capsys.readouterr().out)


def test_a_checkpoint_that_is_not_a_mapping_is_set_aside(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    torch.save([1, 2, 3], path)
    assert Checkpoint(path, "f").load() is None
    assert "not a checkpoint of this pipeline" in capsys.readouterr().out
    assert not path.exists()


def test_a_checkpoint_whose_tensors_do_not_fit_is_set_aside_and_training_starts_afresh(project, capsys):
    cfg = config.load()
    name = "baseline"
    checkpoint = baseline_stopped_in_epoch_two(cfg)
    state = torch.load(checkpoint, weights_only=True)
    state["model"] = {k: v.reshape(-1)[:1].clone() for k, v in state["model"].items()}  # plain data, wrong shapes
    torch.save(state, checkpoint)
    capsys.readouterr()
    train_stage.run(cfg, name, progress=False)
    out = capsys.readouterr().out
    assert "set aside as baseline.pt.rejected: its state does not fit this model (RuntimeError)" in out
    assert pd.read_csv(paths.history_file(name))["epoch"].tolist() == [1, 2]
    assert checkpoint.with_name("baseline.pt.rejected").exists()
    assert torch.load(checkpoint, weights_only=True)["complete"], "the fresh run checkpointed as usual"


def test_weight_decay_scope_weights_leaves_norms_and_biases_undecayed():
    model = models.build_model(config.ResNetModelConfig(width=4, blocks=[1, 0, 1], downsample="pool"))
    cfg = train_config(model={"arch": "resnet", "width": 4, "blocks": [1, 0, 1], "downsample": "pool"},
                       optimizer={"name": "sgd", "lr": 0.1, "weight_decay": 5e-4, "weight_decay_scope": "weights"})
    optimizer = make_optimizer(cfg, parameter_groups(model, cfg))
    decayed, undecayed = optimizer.param_groups
    assert decayed["weight_decay"] == 5e-4 and undecayed["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in undecayed["params"])
    assert len(decayed["params"]) + len(undecayed["params"]) == len(list(model.parameters()))
    everything = train_config(model=cfg.model.model_dump(), optimizer={"name": "sgd", "lr": 0.1, "weight_decay": 5e-4})
    assert len(parameter_groups(model, everything)) == 1


AVERAGED = {"epochs": 3, "schedule": "onecycle", "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "ema_decay": 0.9}


def test_a_run_given_its_finished_checkpoint_trains_nothing_and_keeps_its_selection(tmp_path):
    cfg = train_config(**AVERAGED, model=RESNET)
    whole = run_fit(tmp_path, cfg)
    finished = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    again = run_fit(tmp_path / "again", cfg, resume=finished)
    assert without_timing(again.history) == without_timing(whole.history)
    assert again.selected_epoch == whole.selected_epoch
    assert all(torch.equal(again.state[k], whole.state[k]) for k in whole.state)


@pytest.mark.parametrize("resumed_after", [1, 2])
def test_a_run_resumed_after_any_epoch_ends_as_an_uninterrupted_one(tmp_path, resumed_after):
    cfg = train_config(**AVERAGED, model={**RESNET, "dropout": 0.2})
    saved = tmp_path / "after_epoch.pt"

    def keep_checkpoint(record: dict) -> None:  # called before the epoch's own checkpoint is written
        if record["epoch"] == resumed_after + 1:
            shutil.copy(tmp_path / "whole" / "checkpoint.pt", saved)

    whole = run_fit(tmp_path / "whole", cfg, on_epoch=keep_checkpoint)
    resume = Checkpoint(saved, "fingerprint").load()
    assert resume["epoch"] == resumed_after
    resumed = run_fit(tmp_path / "resumed", cfg, resume=resume)
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert all(torch.equal(resumed.state[k], whole.state[k]) for k in whole.state)


