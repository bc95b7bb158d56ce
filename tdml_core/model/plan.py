"""Stage planning: cut a model into contiguous stages balanced against trainers' memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from tdml_core.model.memory import LayerInfo, candidate_units, estimate_layers


class PlanError(ValueError):
    """The model cannot be cut as asked (too few layers, trainers too small)."""


@dataclass
class TrainerSlot:
    """What the planner needs to know of a trainer: a name and, optionally, its memory."""

    name: str
    memory_bytes: int | None = None


@dataclass
class StageInfo:
    index: int
    layers: list[str]
    params: int
    memory_bytes: int
    trainer: str | None = None
    trainer_memory_bytes: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StagePlan:
    layers: list[LayerInfo]
    stages: list[StageInfo]
    method: str = "trace"  # "trace": torch.export graph split; "children": top-level children
    notes: list[str] = field(default_factory=list)

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    def split_points(self) -> list[str]:
        """Module names at which stages 1..S-1 begin."""
        return [s.layers[0] for s in self.stages[1:]]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "layers": [layer.to_dict() for layer in self.layers],
            "stages": [s.to_dict() for s in self.stages],
            "notes": list(self.notes),
        }


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def partition(memory: Sequence[int], capacities: Sequence[int | None]) -> list[int] | None:
    """Cut ``memory`` (per layer) into ``len(capacities)`` contiguous non-empty parts.

    Minimises the largest load ratio memory/capacity (plain memory where a capacity
    is unknown), keeping every part within its capacity. Returns the start index of
    each part, or None when no cut fits.
    """
    n, s = len(memory), len(capacities)
    if s < 1 or s > n:
        return None
    prefix = [0]
    for m in memory:
        prefix.append(prefix[-1] + m)

    def cost(stage: int, i: int, j: int) -> float:
        load = prefix[j] - prefix[i]
        cap = capacities[stage]
        if cap is None:
            return float(load)
        return load / cap if load <= cap else float("inf")

    inf = float("inf")
    # best[k][j]: minimal worst cost of putting the first j layers on the first k stages
    best = [[inf] * (n + 1) for _ in range(s + 1)]
    arg = [[-1] * (n + 1) for _ in range(s + 1)]
    best[0][0] = 0.0
    for k in range(1, s + 1):
        for j in range(k, n - (s - k) + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf:
                    continue
                c = max(best[k - 1][i], cost(k - 1, i, j))
                if c < best[k][j]:
                    best[k][j], arg[k][j] = c, i
    if best[s][n] == inf:
        return None
    starts, j = [], n
    for k in range(s, 0, -1):
        i = arg[k][j]
        starts.append(i)
        j = i
    return starts[::-1]


def _explain_infeasible(layers: list[LayerInfo], slots: list[TrainerSlot]) -> str:
    smallest = min(layer.memory_bytes for layer in layers)
    for slot in slots:
        if slot.memory_bytes is not None and slot.memory_bytes < smallest:
            return (
                f"trainer {slot.name!r} ({_mib(slot.memory_bytes)}) is too small for any stage: "
                f"the smallest layer needs {_mib(smallest)}"
            )
    total = sum(layer.memory_bytes for layer in layers)
    held = ", ".join(f"{s.name}={_mib(s.memory_bytes)}" for s in slots if s.memory_bytes is not None)
    return (
        f"no contiguous split of the model ({_mib(total)} over {len(layers)} layers) fits "
        f"{len(slots)} trainer(s) ({held}); add trainers or give them more memory"
    )


def _build_plan(layers: list[LayerInfo], slots: list[TrainerSlot], named: bool, method: str) -> StagePlan:
    starts = partition([layer.memory_bytes for layer in layers], [s.memory_bytes for s in slots])
    if starts is None:
        raise PlanError(_explain_infeasible(layers, slots))
    bounds = starts + [len(layers)]
    stages = []
    for k, slot in enumerate(slots):
        part = layers[bounds[k] : bounds[k + 1]]
        stages.append(
            StageInfo(
                index=k,
                layers=[layer.name for layer in part],
                params=sum(layer.params for layer in part),
                memory_bytes=sum(layer.memory_bytes for layer in part),
                trainer=slot.name if named else None,
                trainer_memory_bytes=slot.memory_bytes,
            )
        )
    return StagePlan(layers=layers, stages=stages, method=method)


def _slots(n_stages: int | None, trainers, layers: list[LayerInfo]) -> tuple[list[list[TrainerSlot]], bool]:
    """The trainer assignments to try, in order of preference, and whether trainers were named."""
    given = [
        t if isinstance(t, TrainerSlot) else TrainerSlot(t.name, getattr(t, "memory_bytes", None))
        for t in (trainers or [])
    ]
    if n_stages is not None:
        if n_stages < 1:
            raise PlanError(f"stages must be at least 1, got {n_stages}")
        if n_stages > len(layers):
            raise PlanError(
                f"cannot cut {len(layers)} layer(s) into {n_stages} stages "
                f"(layers: {', '.join(layer.name for layer in layers)})"
            )
        if given and len(given) < n_stages:
            raise PlanError(f"{n_stages} stages need {n_stages} trainers, only {len(given)} given")
        if given:
            return [given[:n_stages]], True
        return [[TrainerSlot(f"stage{k}") for k in range(n_stages)]], False
    if not given:
        raise PlanError("stages 'auto' needs trainers (with memory) to plan against")
    if any(t.memory_bytes is None for t in given):
        raise PlanError("stages 'auto' needs the memory of every trainer")
    # auto: the fewest trainers that hold the model, the largest first
    by_memory = sorted(given, key=lambda t: -t.memory_bytes)
    upto = min(len(by_memory), len(layers))
    return [by_memory[:k] for k in range(1, upto + 1)], True


def _traceable(model: nn.Module, example: torch.Tensor, split_points: list[str]) -> str | None:
    """None when torch.distributed.pipelining can trace and split the model, else why not."""
    from tdml_core.model.split import trace_pipe

    try:
        trace_pipe(model, example, split_points)
    except Exception as exc:  # torch.export raises many kinds of errors
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def plan_stages(
    model: nn.Module,
    example_batch: torch.Tensor,
    n_stages: int | None = None,
    trainers=None,
    *,
    bytes_per_value: int = 4,
    optimizer_states: int = 1,
) -> StagePlan:
    """Plan contiguous pipeline stages for ``model``.

    ``example_batch`` is a sample microbatch: its activations enter the memory
    estimate. ``trainers`` is a list of objects with ``name`` and ``memory_bytes``
    (``TrainerSlot`` or the config's ``TrainerSpec``); stage k runs on trainer k.
    With ``n_stages=None`` the plan uses the fewest trainers that hold the model.
    """
    fallback_reason = None
    for expand in (True, False):
        units = candidate_units(model, expand=expand)
        layers = estimate_layers(model, example_batch, units, bytes_per_value, optimizer_states)
        if not layers:
            raise PlanError("the model has no submodules to place on stages")
        options, named = _slots(n_stages, trainers, layers)
        plan, errors = None, []
        for slots in options:
            try:
                plan = _build_plan(layers, slots, named, "trace" if expand else "children")
                break
            except PlanError as exc:
                errors.append(exc)
        if plan is None:
            raise errors[-1]
        if plan.n_stages == 1:
            return plan
        if expand:
            fallback_reason = _traceable(model, example_batch, plan.split_points())
            if fallback_reason is None:
                return plan
            continue
        plan.notes.append(f"tracing failed ({fallback_reason}); split at top-level children")
        return plan
    raise AssertionError("unreachable")
