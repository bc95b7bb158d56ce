"""Aggregation rules: which local models enter the global model, and how they are combined.

Pure functions over state dicts, so that tests and the audit call them directly.
"""

from __future__ import annotations

from typing import Sequence

import torch

State = dict[str, torch.Tensor]


def select_top_k(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` highest scores; ties go to the lower index."""
    if not 1 <= k <= len(scores):
        raise ValueError(f"top_k must be in 1..{len(scores)}, got {k}")
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:k])


def average_states(states: Sequence[State]) -> State:
    """Element-wise mean of floating tensors; integer buffers (BN step counts) from the first."""
    if not states:
        raise ValueError("nothing to average")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise ValueError("local models disagree on their parameter names")
    out: State = {}
    for key in keys:
        first = states[0][key]
        if first.is_floating_point():
            out[key] = torch.stack([s[key].to(torch.float64) for s in states]).mean(0).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def top_k_average(states: Sequence[State], scores: Sequence[float], k: int) -> tuple[State, list[int]]:
    """The global model from the ``k`` best-scoring local models, and which were chosen."""
    chosen = select_top_k(scores, k)
    return average_states([states[i] for i in chosen]), chosen
