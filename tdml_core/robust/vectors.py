"""Updates as flat vectors: what the aggregation and detection rules take as input.

A layer group's update (the difference between a trainer's end-of-epoch
parameters and the ones it started from) is flattened into one float64 vector;
the rules in ``aggregate`` and ``detect`` then work on an ``(n, d)`` matrix with
one such vector per trainer. Torch tensors are accepted without this module
importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral

import numpy as np


def _to_numpy(value) -> np.ndarray:
    """float64 copy of an array or tensor (torch tensors via ``.detach().cpu().numpy()``)."""
    if hasattr(value, "detach"):
        t = value.detach().cpu()
        try:
            value = t.numpy()
        except TypeError:  # bfloat16 and friends have no numpy dtype
            value = t.float().numpy()
    return np.asarray(value, dtype=np.float64)


def flatten(tensors_or_arrays: Mapping) -> np.ndarray:
    """All values of a mapping name -> array concatenated, in sorted-name order, as 1-D float64."""
    if not isinstance(tensors_or_arrays, Mapping):
        raise ValueError(f"flatten takes a mapping name -> array, got {type(tensors_or_arrays).__name__}")
    if not tensors_or_arrays:
        raise ValueError("flatten: nothing to flatten (empty mapping)")
    parts = [_to_numpy(tensors_or_arrays[name]).ravel() for name in sorted(tensors_or_arrays)]
    return np.concatenate(parts)


def update(start: Mapping, end: Mapping) -> dict[str, np.ndarray]:
    """name -> ``end[name] - start[name]`` as float64 arrays, names in sorted order.

    Both mappings must hold the same names with the same shapes.
    """
    for name in start:
        if name not in end:
            raise ValueError(f"update: {name!r} is in start but missing from end")
    for name in end:
        if name not in start:
            raise ValueError(f"update: {name!r} is in end but missing from start")
    out: dict[str, np.ndarray] = {}
    for name in sorted(start):
        a, b = _to_numpy(start[name]), _to_numpy(end[name])
        if a.shape != b.shape:
            raise ValueError(f"update: {name!r} has shape {a.shape} in start but {b.shape} in end")
        out[name] = b - a
    return out


def as_matrix(vectors, what: str = "vectors") -> np.ndarray:
    """``vectors`` as a finite float64 ``(n, d)`` matrix with n >= 1 and d >= 1, else ValueError."""
    try:
        x = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be a numeric (n, d) array: {e}") from None
    if x.ndim != 2:
        raise ValueError(f"{what} must be 2-D (n vectors of d values), got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} is empty: shape {x.shape}")
    if not np.isfinite(x).all():
        bad = sorted({int(i) for i in np.nonzero(~np.isfinite(x))[0]})
        raise ValueError(f"{what} hold non-finite values (NaN or inf) in rows {bad}")
    return x


def check_count(value, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools refused), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
