import pytest
import torch

from tdml_core.artifacts import ArtifactError, get_state, put_state, state_bytes, state_digest, state_from_bytes
from tdml_core.crypto import CryptoError, new_data_key
from tdml_core.model import build_model
from tdml_core.storage import IntegrityError, open_store


def _state():
    model = build_model("resnet18", 10, 3, torch.randn(2, 3, 16, 16), seed=0)
    return model.state_dict()


def test_round_trip_is_exact_and_deterministic():
    state = _state()
    raw = state_bytes(state)
    back = state_from_bytes(raw)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    shuffled = dict(reversed(list(state.items())))
    assert state_bytes(shuffled) == raw and state_digest(shuffled) == state_digest(state)
    with pytest.raises(ArtifactError):
        state_from_bytes(b"\x80\x04pickle")


def test_sealed_state_in_the_store(tmp_path):
    store, key = open_store(f"local:{tmp_path}"), new_data_key()
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    cid, dig = put_state(store, key, 5, "local/0", state)
    back = get_state(store, key, 5, "local/0", cid, dig)
    assert torch.equal(back["w"], state["w"]) and int(back["n"]) == 3
    with pytest.raises(CryptoError):
        get_state(store, key, 5, "local/1", cid, dig)  # same bytes under another role
    other_cid, _ = put_state(store, key, 5, "local/0", {"w": torch.zeros(2, 3), "n": torch.tensor(3)})
    with pytest.raises(IntegrityError, match="committed digest"):
        get_state(store, key, 5, "local/0", other_cid, dig)  # a swapped artifact under the same role


def test_opened_states_give_each_reader_its_own_dict_and_drop_the_least_recently_used():
    from tdml_core.artifacts import OpenedStates

    a, b = {"w": torch.ones(4)}, {"w": torch.zeros(4)}  # 16 bytes each
    cache = OpenedStates(max_bytes=40)
    cache.put(("a",), a, copy=True)
    a["w"] += 1  # the owner changes its state after putting it: the kept snapshot does not move
    got = cache.get(("a",))
    assert torch.equal(got["w"], torch.ones(4))
    got["extra"] = torch.zeros(1)  # a reader's own dict
    assert list(cache.get(("a",))) == ["w"]
    cache.put(("b",), b)
    cache.get(("a",))  # a is now the most recently used
    cache.put(("c",), {"w": torch.full((4,), 2.0)})  # 48 bytes > 40: b goes first
    assert cache.get(("b",)) is None and cache.get(("a",)) is not None and cache.get(("c",)) is not None
    cache.put(("big",), {"w": torch.zeros(11)})  # larger than the bound: never kept
    assert cache.get(("big",)) is None and cache.get(("a",)) is not None
    assert (cache.hits, cache.misses) == (6, 2)
