"""Cross-validation: score a model on the fixed test set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for i in range(0, len(y), batch_size):
            logits = model(x[i : i + batch_size])
            target = y[i : i + batch_size]
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(1) == target).sum().item()
    finally:
        model.train(was_training)
    return correct / len(y), loss_sum / len(y)
