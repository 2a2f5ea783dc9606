"""Training compute of a recipe in FLOPs, which no machine changes: how recipes are compared for cost;
and this machine's training speed, to say how long a recipe will take here.

FLOPs are counted by torch's FlopCounterMode on one forward and backward pass (convolutions and matrix
products; batch norm, activations and the optimizer are not counted).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import Recipe
from pipeline.device import memory_format
from pipeline.models import build_model
from pipeline.train import train_step


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


def training_images_per_s(recipe: Recipe, device: torch.device, bf16: bool, steps: int = 2) -> float:
    """Images per second of training steps on a throwaway copy of the recipe's model and random images.

    The first step is not timed: it pays for creating the kernels. Building the model draws from the
    global random generator, so call this before the training seeds it, not during training.
    """
    model = build_model(recipe.model).to(device, memory_format=memory_format(device)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    images = torch.randn(recipe.batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory_format(device))
    labels = torch.randint(0, 10, (recipe.batch_size,), device=device)
    for step in range(steps + 1):
        if step == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        train_step(model, nn.CrossEntropyLoss(), optimizer, images, labels, bf16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return recipe.batch_size * steps / (time.perf_counter() - started)
