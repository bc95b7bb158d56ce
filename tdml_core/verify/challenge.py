"""Which steps a trainer must reveal: drawn from randomness fixed only after it committed."""

from __future__ import annotations

import hashlib


def pick(seed: bytes, who: str, n_steps: int, checks: int, last: bool = True) -> list[int]:
    """``checks`` distinct steps of ``n_steps``, and always the last one, drawn from ``seed`` for ``who``.

    The last step is always checked because it ends in the committed weights: an
    update that does not come from the recorded steps fails there. ``seed`` is
    what nobody knew when committing (a later block's hash); ``who`` names the
    trainer (its address, or its slot), so every trainer draws its own steps.
    ``last=False`` draws the random steps alone (to measure what they catch).
    """
    if n_steps <= 0:
        return []
    chosen: set[int] = {n_steps - 1} if last else set()
    want = min(n_steps, checks + (1 if last else 0))
    counter = 0
    while len(chosen) < want:
        h = hashlib.sha256(seed + who.encode() + counter.to_bytes(8, "big")).digest()
        chosen.add(int.from_bytes(h[:8], "big") % n_steps)
        counter += 1
    return sorted(chosen)
