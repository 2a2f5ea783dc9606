"""Scoring a model: logits in eval mode, and loss and accuracy from them. Training scores every epoch
with these, and evaluation scores the kept models with them, so that both figures are the same."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.device import autocast


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int, bf16: bool = False) -> Tensor:
    """Logits (float32) for images already on the model's device, in eval mode."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        with autocast(images.device, bf16):
            outputs.append(model(images[start:start + batch_size]).float())
    return torch.cat(outputs)


def score(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """(cross-entropy loss, accuracy) without label smoothing, so both models are comparable."""
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()
