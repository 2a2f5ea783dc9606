"""Training compute of a recipe in FLOPs, which no machine changes: how recipes are compared for cost.

Counted by torch's FlopCounterMode on one forward and backward pass (convolutions and matrix products;
batch norm, activations and the optimizer are not counted).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import Recipe
from pipeline.models import build_model


def training_flops_per_image(model_cfg) -> float:
    """FLOPs of one training image: the forward and the backward pass."""
    model = build_model(model_cfg)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops() / 2


def training_flops(recipe: Recipe, train_images: int) -> float:
    """FLOPs of the epochs a recipe runs (not the schedule it plans) over `train_images` images each."""
    return training_flops_per_image(recipe.model) * train_images * recipe.epochs
