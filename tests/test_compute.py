"""pipeline/compute.py: a recipe's training FLOPs, counted by torch, over the epochs it runs; its speed here."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.compute import training_flops, training_flops_per_image, training_images_per_s
from pipeline.config import BaselineModelConfig, Recipe


def recipe(**values) -> Recipe:
    return Recipe.model_validate({"model": {"arch": "baseline", "widths": [4], "hidden": 8}, "epochs": 3,
                                  "batch_size": 8, "optimizer": {"name": "sgd", "lr": 0.1}, "seed": 0, **values})


def test_a_training_image_costs_at_least_three_times_its_first_convolution_forward():
    # Forward: 3x3x3 multiply-adds per output, 4 channels, 32x32 outputs, each counted as two FLOPs; the
    # backward pass costs about twice the forward (weight gradients; the input layer needs no input gradient).
    flops = training_flops_per_image(BaselineModelConfig(widths=[4], hidden=8))
    first_conv = 2 * 27 * 4 * 32 * 32
    assert flops >= 2 * first_conv
    assert training_flops_per_image(BaselineModelConfig(widths=[8], hidden=8)) > flops, "wider costs more"


def test_a_run_counts_the_epochs_it_runs_not_the_schedule_it_plans():
    per_image = training_flops_per_image(recipe().model)
    assert training_flops(recipe(), 1000) == pytest.approx(per_image * 1000 * 3)
    assert training_flops(recipe(schedule="onecycle", schedule_epochs=20), 1000) == pytest.approx(per_image * 1000 * 3)


def test_the_training_speed_is_measured_on_this_machine():
    speed = training_images_per_s(recipe(), torch.device("cpu"), bf16=False)
    assert math.isfinite(speed) and speed > 0
