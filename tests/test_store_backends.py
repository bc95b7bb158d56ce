"""Every store backend passes the same tests: the embedded local one and the real services."""

import pytest

from tdml_core.storage import IntegrityError, NotFound, compute_cid, open_store
from tests.test_storage import VECTORS, blob


def test_same_ids_on_every_backend(store_url):
    store = open_store(store_url)
    assert store.put(b"hello") == "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
    for n, seed, cid in VECTORS[2:]:
        data = blob(n, seed)
        assert store.put(data) == cid
        assert store.has(cid)
        assert bytes(store.get(cid)) == data


def test_missing_blob(store_url):
    store = open_store(store_url)
    cid = compute_cid(b"nobody stored this " + store_url.encode())
    assert not store.has(cid)
    if store_url.startswith("ipfs://"):
        return  # an IPFS node would search the network for it; there is none here
    with pytest.raises(NotFound):
        store.get(cid)


def test_swapped_object_in_s3_is_caught(s3_endpoint):
    store = open_store(f"s3://tdml-test?endpoint={s3_endpoint}")
    cid = store.put(b"the real local model")
    store.s3.put_object(Bucket="tdml-test", Key=cid, Body=b"a swapped local model")
    with pytest.raises(IntegrityError):
        store.get(cid)
