"""Per-layer memory estimate (paper Eq. 1).

memory(layer) = P * b                weights
              + P * b                gradients
              + P * b * k            optimizer state (k = 0 SGD, 1 momentum, 2 Adam)
              + A * b                activations of one sample microbatch

with P the layer's parameter count, A the number of activation elements its
modules produce on one microbatch, and b the bytes per value (4 fp32, 2 fp16).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

BYTES_PER_VALUE = {"fp32": 4, "fp16": 2, "bf16": 2}
OPTIMIZER_STATES = {"sgd": 1, "adam": 2}  # SGD with momentum keeps one buffer

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class LayerInfo:
    name: str  # the module's qualified name in the model
    params: int
    activations: int  # elements produced on the sample microbatch
    memory_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def _expand(prefix: str, module: nn.Module) -> list[str]:
    children = list(module.named_children())
    if isinstance(module, _CONTAINERS) and children:
        return [n for name, child in children for n in _expand(f"{prefix}.{name}", child)]
    return [prefix]


def candidate_units(model: nn.Module, expand: bool = True) -> list[str]:
    """Module names a stage boundary may fall before, in definition order.

    With ``expand`` containers (Sequential, ModuleList) are opened up, so that a
    ResNet's ``layer1`` offers each residual block as a unit.
    """
    children = list(model.named_children())
    if not expand:
        return [name for name, _ in children]
    units = [n for name, child in children for n in _expand(name, child)]
    if len(units) == 1:  # a model wrapping one big module: look one level inside
        inner = model.get_submodule(units[0])
        deeper = [f"{units[0]}.{n}" for n, _ in inner.named_children()]
        if deeper:
            units = deeper
    return units


def _numel(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (tuple, list)):
        return sum(_numel(v) for v in value)
    if isinstance(value, dict):
        return sum(_numel(v) for v in value.values())
    return 0


def estimate_layers(
    model: nn.Module,
    example_microbatch: torch.Tensor,
    units: list[str],
    bytes_per_value: int = 4,
    optimizer_states: int = 1,
) -> list[LayerInfo]:
    """Run one microbatch through ``model`` and estimate each unit's memory.

    Units come back in the order the forward pass first calls them; units the
    forward never calls are left out. The pass runs in eval mode under no_grad,
    so BatchNorm statistics are not touched.
    """
    order: list[str] = []
    activations = {u: 0 for u in units}
    handles = []

    def on_unit(name):
        def hook(_module, _inputs, _output):
            if name not in order:
                order.append(name)
        return hook

    def on_leaf(unit):
        def hook(_module, _inputs, output):
            activations[unit] += _numel(output)
        return hook

    for unit in units:
        module = model.get_submodule(unit)
        handles.append(module.register_forward_hook(on_unit(unit)))
        leaves = [m for m in module.modules() if not list(m.children())] or [module]
        for leaf in leaves:
            handles.append(leaf.register_forward_hook(on_leaf(unit)))

    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_microbatch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    covered = {id(p) for u in order for p in model.get_submodule(u).parameters()}
    loose = sum(p.numel() for p in model.parameters() if id(p) not in covered)

    layers = []
    for i, unit in enumerate(order):
        params = sum(p.numel() for p in model.get_submodule(unit).parameters())
        if i == 0:
            params += loose  # parameters owned outside every unit travel with the first stage
        act = activations[unit]
        mem = params * bytes_per_value * (2 + optimizer_states) + act * bytes_per_value
        layers.append(LayerInfo(unit, params, act, mem))
    return layers
