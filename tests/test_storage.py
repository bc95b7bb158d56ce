"""Content ids match an IPFS node's; stored bytes are checked on the way back."""

import pytest

from tdml_core.storage import IntegrityError, NotFound, StoreError, compute_cid, open_store
from tdml_core.storage.cid import cid_parse


def blob(n: int, seed: int) -> bytes:
    """A deterministic byte string (32-bit LCG, top byte); the same generator made the vectors."""
    out, x = bytearray(n), seed
    for i in range(n):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        out[i] = x >> 24
    return bytes(out)


# Computed independently with ipfs-unixfs-importer 17.1.1 (the JS IPFS importer) with
# cidVersion 1, rawLeaves, fixedSize(262144), balanced(maxChildrenPerNode: 174), as Kubo adds.
VECTORS = [
    (0, 1, "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"),
    (5, 2, "bafkreicolelikcweedi4rmghn54giob3ztiwdd5xt7bntdbyefredvbbji"),
    (262144, 3, "bafkreia3wn36i5ggxvy6cpktw6rjc2ciur626rinnvhciizu6dghf73sqq"),
    (262145, 4, "bafybeiacar55miutwskxzrxgkwc5lpg7exkoadseotw2nvu54haczvantq"),
    (1048576 + 123, 5, "bafybeifzxpickolej3ldk6jpiwfco4rxkkpnhzu5ivpdf37x2eo54fplre"),
]
# 175 chunks: the balanced layout grows a second level of dag-pb nodes
BIG = (175 * 262144 + 7, 7, "bafybeih26pa4xrwsjcpxkgkuprgh6pvq2uditwqeltihrty5fbadkdoc6u")


def test_hello_has_the_ipfs_cid(tmp_path):
    store = open_store(f"local:{tmp_path}")
    assert store.put(b"hello") == "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
    assert store.get("bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq") == b"hello"


@pytest.mark.parametrize("n, seed, cid", VECTORS)
def test_cids_match_the_ipfs_importer(n, seed, cid, tmp_path):
    data = blob(n, seed)
    assert compute_cid(data) == cid
    store = open_store(f"local:{tmp_path}")
    assert store.put(data) == cid
    assert store.has(cid) and bytes(store.get(cid)) == data


def test_two_level_dag_matches_the_ipfs_importer(tmp_path):
    n, seed, cid = BIG
    data = bytearray(n)
    x = seed
    for i in range(n):  # same LCG as blob(), inlined: 45 MB
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        data[i] = x >> 24
    assert compute_cid(data) == cid


def test_a_flipped_byte_in_a_block_is_caught(tmp_path):
    store = open_store(f"local:{tmp_path}")
    data = blob(600_000, 9)  # three leaves under one dag-pb node
    cid = store.put(data)
    leaves = [p for p in tmp_path.rglob("bafkrei*")]
    assert len(leaves) == 3
    raw = bytearray(leaves[1].read_bytes())
    raw[100] ^= 0x01
    leaves[1].write_bytes(raw)
    with pytest.raises(IntegrityError):
        store.get(cid)
    root = store.put(b"small blob")
    path = next(tmp_path.rglob(root))
    path.write_bytes(b"small blob!")
    with pytest.raises(IntegrityError):
        store.get(root)


def test_missing_and_bad_ids_and_urls(tmp_path):
    store = open_store(f"local:{tmp_path}")
    with pytest.raises(NotFound):
        store.get(compute_cid(b"never stored"))
    with pytest.raises(StoreError):
        store.get("Qm-not-a-cidv1")
    with pytest.raises(StoreError, match="unknown store"):
        open_store("ftp://somewhere")
    assert cid_parse(compute_cid(b"x"))[0] == 0x55
