"""A binary Merkle tree over a trainer's per-step records (RFC 6962 hashing).

Leaves and inner nodes are hashed with different prefixes, so no inner node can
pass for a leaf; a proof is the list of sibling hashes from the leaf up, which
together with the leaf's index and the tree's size fixes the path.
"""

from __future__ import annotations

import hashlib


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two below ``n`` (RFC 6962's k)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def root(leaves: list[bytes]) -> bytes:
    """The root of the tree over ``leaves`` (leaf hashes)."""
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return _node(root(leaves[:k]), root(leaves[k:]))


def proof(leaves: list[bytes], index: int) -> list[bytes]:
    """The audit path of leaf ``index``: sibling hashes from the bottom up."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} of {len(leaves)}")
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return proof(leaves[:k], index) + [root(leaves[k:])]
    return proof(leaves[k:], index - k) + [root(leaves[:k])]


def all_proofs(leaves: list[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root and every leaf's audit path at once (``proof`` for each leaf, in O(n log n))."""
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    if len(leaves) == 1:
        return leaves[0], [[]]
    k = _split(len(leaves))
    left, lp = all_proofs(leaves[:k])
    right, rp = all_proofs(leaves[k:])
    return _node(left, right), [p + [right] for p in lp] + [p + [left] for p in rp]


def verify(leaf: bytes, index: int, size: int, path: list[bytes], expected_root: bytes) -> bool:
    """Whether ``leaf`` is leaf ``index`` of a ``size``-leaf tree with ``expected_root``."""
    if not 0 <= index < size:
        return False

    def climb(lo: int, n: int, path: list[bytes]) -> bytes | None:
        # the root of the subtree of n leaves starting at lo that holds index, from the path's tail
        if n == 1:
            return leaf if not path else None
        k = _split(n)
        if not path:
            return None
        sibling, rest = path[-1], path[:-1]
        if index < lo + k:
            below = climb(lo, k, rest)
            return None if below is None else _node(below, sibling)
        below = climb(lo + k, n - k, rest)
        return None if below is None else _node(sibling, below)

    return climb(0, size, list(path)) == expected_root
