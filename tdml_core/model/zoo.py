"""The models TDML ships, and loading a user's model factory by name."""

from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits (1 channel, 10 classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.LazyLinear(128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def _cifar_resnet(depth: int, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision's ResNet in the CIFAR-10 layout: 3x3 stem, stride 1, no max-pool."""
    from tdml_core.model.vision import TorchvisionUnavailable, torchvision_module

    try:
        models = torchvision_module("models")
    except TorchvisionUnavailable as exc:
        raise ModelError(f"resnet{depth}: {exc}") from None
    net = getattr(models, f"resnet{depth}")(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": lambda num_classes, in_channels: DigitsCNN(num_classes, in_channels),
    "resnet18": lambda num_classes, in_channels: _cifar_resnet(18, num_classes, in_channels),
    "resnet50": lambda num_classes, in_channels: _cifar_resnet(50, num_classes, in_channels),
}


class ModelError(ValueError):
    pass


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """A built-in name, or ``package.module:function`` for a user's own factory."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ModelError(
            f"unknown model {name!r}: use one of {sorted(BUILTIN)} or 'package.module:function'"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"model {name!r}: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"model {name!r}: {module_name} has no callable {attr!r}")
    return factory


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    example: torch.Tensor,
    seed: int,
    kwargs: dict | None = None,
) -> nn.Module:
    """Build a model with seeded weights; lazy layers are materialised on ``example``."""
    factory = resolve_factory(name)
    torch.manual_seed(seed)
    try:
        if name in BUILTIN:
            model = factory(num_classes, in_channels)
        else:
            model = factory(**(kwargs or {}))
    except ModelError:
        raise
    except Exception as exc:  # a user's factory may raise anything: name it in one line
        raise ModelError(f"model {name!r}: the factory raised {_one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {name!r}: factory returned {type(model).__name__}, not nn.Module")
    with torch.no_grad():
        was_training = model.training
        model.eval()  # a dry run in eval mode materialises lazy layers without touching BN stats
        try:
            model(example)
        except Exception as exc:
            raise ModelError(
                f"model {name!r} does not fit the input: forward on a batch of shape {tuple(example.shape)} "
                f"raised {_one_line(exc)}"
            ) from exc
        model.train(was_training)
    return model


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
