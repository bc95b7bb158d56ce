"""Which steps a trainer must reveal: drawn from randomness fixed only after it committed."""

from __future__ import annotations

import hashlib
import math


def pick(seed: bytes, who: str, n_steps: int, checks: int, last: bool = True, every: int = 1) -> list[int]:
    """The steps whose segments are checked: ``checks`` steps' worth of distinct segments, and always the last.

    A segment is a checkpoint and the steps up to the next one (``every`` steps; 1: each step is its own),
    and a check replays all of it, so ``ceil(checks / every)`` segments are drawn; each is named by its
    first step. The last segment is always checked because it ends in the committed weights: an update
    that does not come from the recorded steps fails there. ``seed`` is what nobody knew when committing
    (a later block's hash); ``who`` names what draws (its pipeline, under the protocol), so each draws its
    own. ``last=False`` draws the random segments alone (to measure what they catch).
    """
    if n_steps <= 0:
        return []
    n_segments = math.ceil(n_steps / every)
    chosen: set[int] = {n_segments - 1} if last else set()
    want = min(n_segments, math.ceil(checks / every) + (1 if last else 0))
    counter = 0
    while len(chosen) < want:
        h = hashlib.sha256(seed + who.encode() + counter.to_bytes(8, "big")).digest()
        chosen.add(int.from_bytes(h[:8], "big") % n_segments)
        counter += 1
    return sorted(s * every for s in chosen)
