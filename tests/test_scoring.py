"""pipeline/scoring.py: logits in eval mode, batch by batch; loss and accuracy without label smoothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.scoring import predict, score


def test_predict_scores_in_eval_mode_and_batches_do_not_change_the_logits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    images = torch.randn(10, 6)
    batched = predict(model, images, batch_size=3)  # batches of 3, 3, 3 and 1: only eval mode handles the last
    assert not model.training
    with torch.no_grad():
        whole = model(images)
    torch.testing.assert_close(batched, whole)
    assert batched.dtype == torch.float32


def test_predict_in_bf16_returns_float32_logits_close_to_fp32():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    images = torch.randn(5, 6)
    logits = predict(model, images, batch_size=4, bf16=True)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, predict(model, images, batch_size=4), atol=0.05, rtol=0.05)


def test_score_is_the_plain_cross_entropy_and_the_share_of_right_answers():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.5]])
    labels = torch.tensor([0, 1, 1, 1])
    loss, accuracy = score(logits, labels)
    assert accuracy == pytest.approx(0.75)
    assert loss == pytest.approx(F.cross_entropy(logits, labels).item())
