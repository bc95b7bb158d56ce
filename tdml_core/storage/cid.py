"""IPFS content ids computed locally, as ``ipfs add --cid-version=1`` gives them.

UnixFS file, raw leaves, fixed 256 KiB chunks, balanced layout with at most 174
links per node, sha2-256, CIDv1 in base32. A blob of one chunk is a single raw
block; larger blobs get dag-pb nodes over their leaves. ``build_dag`` yields the
blocks leaf-first, so a store can write them one at a time while the input is
read once through a memoryview (never copied whole).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Iterator

CHUNK_SIZE = 256 * 1024
MAX_LINKS = 174
RAW, DAG_PB = 0x55, 0x70
SHA2_256 = 0x12


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def cid_bytes(codec: int, block: bytes | memoryview) -> bytes:
    digest = hashlib.sha256(block).digest()
    return varint(1) + varint(codec) + bytes([SHA2_256, len(digest)]) + digest


def cid_str(raw: bytes) -> str:
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


def cid_parse(cid: str) -> tuple[int, bytes]:
    """(codec, sha256 digest) of a CIDv1 base32 string."""
    if not cid.startswith("b"):
        raise ValueError(f"not a base32 CIDv1: {cid!r}")
    body = cid[1:].upper()
    raw = base64.b32decode(body + "=" * (-len(body) % 8))
    version, pos = read_varint(raw, 0)
    codec, pos = read_varint(raw, pos)
    if version != 1 or raw[pos] != SHA2_256 or raw[pos + 1] != 32:
        raise ValueError(f"unsupported CID {cid!r}: only CIDv1 sha2-256")
    return codec, raw[pos + 2 : pos + 34]


# -- protobuf, just the fields dag-pb and UnixFS use --------------------------------
def _field(num: int, wire: int) -> bytes:
    return varint((num << 3) | wire)


def _bytes_field(num: int, data: bytes) -> bytes:
    return _field(num, 2) + varint(len(data)) + data


def _uint_field(num: int, value: int) -> bytes:
    return _field(num, 0) + varint(value)


@dataclass
class Link:
    cid: bytes  # binary CID
    tsize: int  # bytes of the linked sub-DAG, blocks included
    filesize: int  # file bytes under it


def encode_file_node(links: list[Link]) -> bytes:
    """A dag-pb node holding a UnixFS File over ``links`` (links first, then data)."""
    unixfs = _uint_field(1, 2) + _uint_field(3, sum(l.filesize for l in links))
    for link in links:
        unixfs += _uint_field(4, link.filesize)
    out = b""
    for link in links:
        pb_link = _bytes_field(1, link.cid) + _bytes_field(2, b"") + _uint_field(3, link.tsize)
        out += _bytes_field(2, pb_link)
    return out + _bytes_field(1, unixfs)


def decode_links(node: bytes) -> list[bytes]:
    """Binary CIDs of a dag-pb node's links, in order."""
    links, pos = [], 0
    while pos < len(node):
        key, pos = read_varint(node, pos)
        if key & 7 != 2:
            raise ValueError("unexpected dag-pb field")
        size, pos = read_varint(node, pos)
        body, pos = node[pos : pos + size], pos + size
        if key >> 3 == 2:
            p = 0
            while p < len(body):
                k, p = read_varint(body, p)
                if k & 7 == 2:
                    n, p = read_varint(body, p)
                    if k >> 3 == 1:
                        links.append(bytes(body[p : p + n]))
                    p += n
                else:
                    _, p = read_varint(body, p)
    return links


def build_dag(data: bytes | memoryview) -> Iterator[tuple[bytes, int, memoryview | bytes]]:
    """Yield (binary CID, codec, block) for every block, children before parents; the root last."""
    view = memoryview(data)
    if len(view) <= CHUNK_SIZE:
        yield cid_bytes(RAW, view), RAW, view
        return
    level: list[Link] = []
    for off in range(0, len(view), CHUNK_SIZE):
        chunk = view[off : off + CHUNK_SIZE]
        cid = cid_bytes(RAW, chunk)
        yield cid, RAW, chunk
        level.append(Link(cid, len(chunk), len(chunk)))
    while True:
        parents: list[Link] = []
        for i in range(0, len(level), MAX_LINKS):
            group = level[i : i + MAX_LINKS]
            node = encode_file_node(group)
            cid = cid_bytes(DAG_PB, node)
            yield cid, DAG_PB, node
            parents.append(Link(cid, len(node) + sum(l.tsize for l in group), sum(l.filesize for l in group)))
        if len(parents) == 1:
            return
        level = parents


def compute_cid(data: bytes | memoryview) -> str:
    """The CID an IPFS node gives ``data`` with cid-version 1 (raw leaves, 256 KiB chunks)."""
    root = None
    for cid, _, _ in build_dag(data):
        root = cid
    return cid_str(root)
