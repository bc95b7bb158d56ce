"""The global model from the epoch's local models, by the rule the spec names.

``top_k`` averages the K best-scoring unflagged local models. Every other rule
works on the unflagged pipelines' updates relative to the epoch's global model
(flattened over the floating-point entries of the state) and adds the rule's
result to it; integer buffers come from the first pipeline used.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from tdml_core.robust import aggregate

State = dict[str, torch.Tensor]


def _floats(state: State) -> list[str]:
    return [k for k in sorted(state) if state[k].is_floating_point()]


def flatten_update(start: State, end: State, names: Sequence[str]) -> np.ndarray:
    return np.concatenate([(end[k].to(torch.float64) - start[k].to(torch.float64)).numpy().ravel() for k in names])


def combine(rule: str, start: State, states: Sequence[State], scores: Sequence[float], eligible: Sequence[int],
            *, top_k: int, f: int = 1, tau: float = 1.0, iters: int = 1) -> tuple[State, list[int], str]:
    """(global state, pipelines used, the rule as applied); ``states[p]`` for every p in ``eligible``.

    When too few pipelines are left for the rule's ``f``, ``f`` shrinks to the
    largest the rule allows (and the applied rule says so).
    """
    if not eligible:
        raise ValueError("every local model was flagged; there is nothing to aggregate")
    if rule == "top_k":
        best = aggregate.select_top_k([scores[p] for p in eligible], min(top_k, len(eligible)))
        chosen = [eligible[i] for i in best]
        return aggregate.average_states([states[p] for p in chosen]), chosen, f"top_k (k={len(chosen)})"
    n = len(eligible)
    names = _floats(start)
    vectors = np.stack([flatten_update(start, states[p], names) for p in eligible])
    chosen = list(eligible)
    if rule == "mean":
        u, applied = aggregate.mean(vectors), "mean"
    elif rule == "median":
        u, applied = aggregate.median(vectors), "median"
    elif rule == "trimmed_mean":
        ff = min(f, (n - 1) // 2)
        u, applied = aggregate.trimmed_mean(vectors, ff), f"trimmed_mean (f={ff})"
    elif rule == "multi_krum":
        if n < 3:
            u, applied = aggregate.mean(vectors), f"mean ({n} pipelines: too few for multi_krum)"
        else:
            ff = min(f, n - 3)
            sel = aggregate.multi_krum_selection(vectors, ff)
            chosen = [eligible[i] for i in sel]
            u, applied = vectors[sel].mean(axis=0), f"multi_krum (f={ff})"
    elif rule == "centered_clip":
        u, applied = aggregate.centered_clip(vectors, tau, iters), f"centered_clip (tau={tau:g}, iters={iters})"
    else:
        raise ValueError(f"unknown aggregation rule {rule!r}")
    out: State = {}
    i = 0
    for k in sorted(start):
        v = start[k]
        if v.is_floating_point():
            size = v.numel()
            out[k] = (v.to(torch.float64) + torch.from_numpy(u[i:i + size].reshape(v.shape))).to(v.dtype)
            i += size
        else:
            out[k] = states[chosen[0]][k].clone()
    return out, chosen, applied
