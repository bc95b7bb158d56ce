"""Model states as artifacts: a deterministic, pickle-free byte format, sealed into the store.

A state's bytes are the same for the same tensors on every machine, so their
SHA-256 is a commitment anyone can re-check; and loading them never runs code
(unlike ``torch.load`` of a pickle a dishonest trainer could have crafted).

    b"TDMLSTATE1" | u32 header length | JSON header | raw tensor bytes (in header order)
"""

from __future__ import annotations

import json
import struct
import threading
from collections import OrderedDict

import numpy as np
import torch

from tdml_core.crypto import digest, open_envelope, seal
from tdml_core.storage import ContentStore, IntegrityError

MAGIC = b"TDMLSTATE1"
_DTYPES = {
    torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
    torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8", torch.bool: "bool",
}
_BY_NAME = {v: k for k, v in _DTYPES.items()}


class ArtifactError(ValueError):
    pass


def state_bytes(state: dict[str, torch.Tensor]) -> bytes:
    header, blobs, offset = [], [], 0
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        if t.dtype not in _DTYPES:
            raise ArtifactError(f"{name}: dtype {t.dtype} is not supported")
        raw = t.numpy().tobytes() if t.dtype != torch.bool else t.to(torch.uint8).numpy().tobytes()
        header.append({"name": name, "dtype": _DTYPES[t.dtype], "shape": list(t.shape), "offset": offset,
                       "size": len(raw)})
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + b"".join(blobs)


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    if data[: len(MAGIC)] != MAGIC:
        raise ArtifactError("not a TDML state")
    (n,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start : start + n])
    except ValueError:
        raise ArtifactError("damaged state header") from None
    body = memoryview(data)[start + n :]
    out = {}
    for entry in header:
        dtype = _BY_NAME.get(entry["dtype"])
        if dtype is None or entry["offset"] + entry["size"] > len(body):
            raise ArtifactError(f"damaged state entry {entry.get('name')!r}")
        raw = body[entry["offset"] : entry["offset"] + entry["size"]]
        np_dtype = np.uint8 if dtype is torch.bool else np.dtype(entry["dtype"])
        arr = np.frombuffer(raw, dtype=np_dtype).reshape(entry["shape"]).copy()
        t = torch.from_numpy(arr)
        out[entry["name"]] = t.bool() if dtype is torch.bool else t
    return out


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """The hex SHA-256 of a state's canonical bytes: what a weight commitment carries."""
    return digest(state_bytes(state))


def doc_bytes(doc: dict) -> bytes:
    """A JSON document's canonical bytes (sorted keys, no spaces): what its digest is taken of."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def put_sealed(store: ContentStore, key: bytes, job_id: int, role: str, raw: bytes) -> tuple[str, str]:
    """Seal ``raw`` with ``key`` (bound to job and role) and store it: (cid of the envelope, digest of ``raw``)."""
    return store.put(seal(key, raw, job_id, role)), digest(raw)


def open_sealed(key: bytes, envelope: bytes, job_id: int, role: str, cid: str, expected_digest: str) -> bytes:
    """Open an envelope fetched by ``cid`` and check its content against the committed digest."""
    raw = open_envelope(key, envelope, job_id, role)
    if digest(raw) != expected_digest.removeprefix("0x"):
        raise IntegrityError(f"{role} ({cid}): the content does not match its committed digest")
    return raw


def put_state(store: ContentStore, key: bytes, job_id: int, role: str, state: dict) -> tuple[str, str]:
    """Seal a model state and store it: (cid of the envelope, state digest)."""
    return put_sealed(store, key, job_id, role, state_bytes(state))


def get_state(store: ContentStore, key: bytes, job_id: int, role: str, cid: str, expected_digest: str) -> dict:
    """Fetch by id, open the envelope, check the committed digest, and only then parse."""
    return state_from_bytes(open_sealed(key, bytes(store.get(cid)), job_id, role, cid, expected_digest))


class OpenedStates:
    """States already opened and checked against their committed digest, kept for their next reader.

    An epoch's stage weights are read by cross-validation, detection and aggregation,
    and the stage inputs the aggregator puts are read back by the next epoch's detection:
    each is fetched, opened and hashed once. Kept by (cid, digest, role, key), so a hit is
    exactly what opening would give; least recently used first out past ``max_bytes``.
    A reader gets its own dict over shared tensors, which it must not change in place.
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, tuple[dict, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> dict | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return dict(item[0])

    def put(self, key: tuple, state: dict, copy: bool = False) -> None:
        """Keep ``state`` (a snapshot of it with ``copy``, for a state its owner may still change)."""
        size = sum(t.numel() * t.element_size() for t in state.values())
        if size > self.max_bytes:
            return
        if copy:
            state = {k: v.detach().cpu().clone() for k, v in state.items()}
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (dict(state), size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= old


def put_doc(store: ContentStore, key: bytes, job_id: int, role: str, doc: dict) -> tuple[str, str]:
    """Seal a small JSON document (a plan, a score, verdicts): (cid, digest of its canonical JSON)."""
    return put_sealed(store, key, job_id, role, doc_bytes(doc))


def get_doc(store: ContentStore, key: bytes, job_id: int, role: str, cid: str, expected_digest: str) -> dict:
    return json.loads(open_sealed(key, bytes(store.get(cid)), job_id, role, cid, expected_digest))
