"""Models used by the tests, importable by name (``tests.models:...``) in stage processes."""

import torch
from torch import nn


class ResidualMLP(nn.Module):
    """A residual connection that is not an nn.Sequential: ``h`` skips over ``b`` and ``c``."""

    def __init__(self, in_features: int = 64, width: int = 48, classes: int = 10):
        super().__init__()
        self.a = nn.Linear(in_features, width)
        self.b = nn.Linear(width, width)
        self.c = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.relu(self.a(torch.flatten(x, 1)))
        y = torch.relu(self.b(h))
        z = torch.relu(self.c(y)) + h
        return self.head(z)


def residual_mlp(in_features: int = 64):
    return ResidualMLP(in_features)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(32, 10)

    def forward(self, x):
        h = self.a(torch.flatten(x, 1))
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


class SequentialChildren(nn.Module):
    """Untraceable too, but its forward is its children in order, so they can be split."""

    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.a = nn.Linear(64, 32)
        self.act = nn.ReLU()
        self.b = nn.Linear(32, 10)

    def forward(self, x):
        for m in self.children():
            x = m(x)
        if x.sum().item() > 1e9:  # .item() breaks the trace
            x = x * 0
        return x
