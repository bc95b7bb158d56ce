"""Aggregation rules: which local models enter the global model, and how they are combined.

Pure functions, so that tests and the audit call them directly:

* over state dicts: ``select_top_k``, ``average_states``, ``top_k_average``;
* over an ``(n, d)`` matrix of flattened updates (one row per trainer, see
  ``tdml_core.robust.vectors.flatten``), the Byzantine-robust rules ``mean``,
  ``median``, ``trimmed_mean``, ``multi_krum`` (with ``krum_scores`` and
  ``multi_krum_selection``) and ``centered_clip``. Each returns a ``(d,)``
  float64 vector and raises ValueError on empty, non-2-D or non-finite input
  and on an ``f`` the rule cannot tolerate.
"""

from __future__ import annotations

from numbers import Real
from typing import Sequence

import numpy as np
import torch

from tdml_core.robust.vectors import as_matrix, check_count

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


# --- robust rules over flattened update vectors -------------------------------------------------


def mean(vectors) -> np.ndarray:
    """Coordinate-wise mean of the ``(n, d)`` rows (no robustness; the baseline)."""
    return as_matrix(vectors).mean(axis=0)


def median(vectors) -> np.ndarray:
    """Coordinate-wise median of the ``(n, d)`` rows (mean of the middle two for even n)."""
    return np.median(as_matrix(vectors), axis=0)


def trimmed_mean(vectors, f: int) -> np.ndarray:
    """Per coordinate: drop the ``f`` largest and ``f`` smallest values, mean of the rest.

    Needs ``n > 2f``; ``f = 0`` is the plain mean.
    """
    x = as_matrix(vectors)
    n = x.shape[0]
    f = check_count(f, "f", 0)
    if n <= 2 * f:
        raise ValueError(f"trimmed_mean needs n > 2f vectors: got n={n}, f={f}")
    return np.sort(x, axis=0)[f : n - f].mean(axis=0)


def _krum_setup(vectors, f) -> tuple[np.ndarray, int]:
    x = as_matrix(vectors)
    n = x.shape[0]
    f = check_count(f, "f", 0)
    if n - f - 2 < 1:
        raise ValueError(f"Krum needs n >= f + 3 vectors (n - f - 2 >= 1 neighbours): got n={n}, f={f}")
    return x, f


def _krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    n = x.shape[0]
    k = n - f - 2
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):  # one row at a time: memory n*d, not n*n*d
        dist = np.sum((x - x[i]) ** 2, axis=1)
        others = np.delete(dist, i)
        scores[i] = np.sort(others)[:k].sum()
    return scores


def krum_scores(vectors, f: int) -> np.ndarray:
    """Krum score of each row: the sum of squared Euclidean distances to its ``n - f - 2``
    nearest other rows (Blanchard et al. 2017). Shape ``(n,)``; needs ``n >= f + 3``."""
    x, f = _krum_setup(vectors, f)
    return _krum_scores(x, f)


def _selection(scores: np.ndarray, n: int, f: int, m) -> list[int]:
    if m is None:
        m = n - f
    m = check_count(m, "m", 1)
    if m > n - f:
        raise ValueError(f"multi_krum selects m in 1..n-f = 1..{n - f}, got m={m}")
    order = np.argsort(scores, kind="stable")  # ties: lower index first
    return sorted(int(i) for i in order[:m])


def multi_krum_selection(vectors, f: int, m: int | None = None) -> list[int]:
    """Sorted indices of the ``m`` rows with the lowest Krum scores (``m = None``: ``n - f``).

    Ties in score go to the lower index, so the choice is deterministic.
    """
    x, f = _krum_setup(vectors, f)
    return _selection(_krum_scores(x, f), x.shape[0], f, m)


def multi_krum(vectors, f: int, m: int | None = None) -> np.ndarray:
    """Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018): mean of the ``m`` rows
    chosen by ``multi_krum_selection``. ``m = 1`` is Krum; needs ``n >= f + 3``."""
    x, f = _krum_setup(vectors, f)
    chosen = _selection(_krum_scores(x, f), x.shape[0], f, m)
    return x[chosen].mean(axis=0)


def centered_clip(vectors, tau: float, iters: int = 1, center=None) -> np.ndarray:
    """Centered clipping (Karimireddy, He, Jaggi 2021).

    ``v <- v + (1/n) sum_i (x_i - v) * min(1, tau / ||x_i - v||)``, repeated ``iters``
    times from ``center`` (default: the coordinate-wise median). A row at distance 0
    from ``v`` contributes its full difference, which is 0.
    """
    x = as_matrix(vectors)
    if isinstance(tau, bool) or not isinstance(tau, Real) or not np.isfinite(tau) or tau <= 0:
        raise ValueError(f"centered_clip needs a finite tau > 0, got {tau!r}")
    iters = check_count(iters, "iters", 1)
    if center is None:
        v = np.median(x, axis=0)
    else:
        v = np.asarray(center, dtype=np.float64)
        if v.shape != (x.shape[1],):
            raise ValueError(f"center must have shape ({x.shape[1]},), got {v.shape}")
        if not np.isfinite(v).all():
            raise ValueError("center holds non-finite values (NaN or inf)")
    for _ in range(iters):
        diff = x - v
        norms = np.sqrt(np.sum(diff**2, axis=1))
        scale = np.ones_like(norms)
        far = norms > tau
        scale[far] = tau / norms[far]
        v = v + (diff * scale[:, None]).mean(axis=0)
    return v
