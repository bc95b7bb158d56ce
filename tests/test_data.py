import pickle

import numpy as np
import pytest

from tdml_core.config import DatasetSpec
from tdml_core.data import DatasetError, batches, load_dataset, shard_indices


def _rows(x) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


def test_digits_is_shipped_and_split_three_ways_stratified():
    ds = load_dataset(DatasetSpec(name="digits"), seed=0)
    assert ds.train_x.shape[1:] == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.train_y) + len(ds.val_y) + len(ds.test_y) == 1797
    assert len(ds.test_y) == 360 and len(ds.val_y) == 216 and len(ds.train_y) == 1221  # 15 % of the 1437
    assert set(ds.test_y.tolist()) == set(range(10)) and set(ds.val_y.tolist()) == set(range(10))
    # stratified: every class's share of the validation set within a sample of its share of the training set
    for c in range(10):
        assert abs(int((ds.val_y == c).sum()) - 216 * float((ds.train_y == c).float().mean())) <= 1.5
    train, val, test = _rows(ds.train_x), _rows(ds.val_x), _rows(ds.test_x)
    assert len(train) == 1221 and not (val & test) and not (val & train) and not (test & train)  # disjoint
    again = load_dataset(DatasetSpec(name="digits"), seed=0)
    assert (again.test_y == ds.test_y).all() and (again.val_y == ds.val_y).all()
    # the validation set does not shrink with `limit`, and it is the same set
    small = load_dataset(DatasetSpec(name="digits", limit=300), seed=0)
    assert len(small.train_y) == 300 and (small.val_y == ds.val_y).all()


def test_a_validation_fraction_that_leaves_nothing_is_refused():
    with pytest.raises(DatasetError, match="validation_fraction"):
        load_dataset(DatasetSpec(name="synthetic", synthetic={"samples": 8, "shape": (1, 2, 2), "classes": 2},
                                 validation_fraction=0.01), seed=0)


def test_shards_are_disjoint_cover_and_deterministic():
    parts = shard_indices(1437, 3, seed=7)
    joined = np.concatenate(parts)
    assert len(joined) == 1437 and len(set(joined.tolist())) == 1437
    assert [len(p) for p in parts] == [479, 479, 479]
    assert all((a == b).all() for a, b in zip(parts, shard_indices(1437, 3, seed=7)))
    assert not all((a == b).all() for a, b in zip(parts, shard_indices(1437, 3, seed=8)))
    with pytest.raises(DatasetError):
        shard_indices(2, 3, seed=0)


def test_batches_are_full_and_seeded():
    ds = load_dataset(DatasetSpec(name="digits"), seed=0)
    got = list(batches(ds.train_x, ds.train_y, 100, seed=1))
    assert len(got) == len(ds.train_y) // 100
    assert all(len(y) == 100 for _, y in got)
    again = list(batches(ds.train_x, ds.train_y, 100, seed=1))
    assert all((a[1] == b[1]).all() for a, b in zip(got, again))


def test_the_rounds_of_an_epoch_train_each_of_its_batches_once_in_order():
    from tdml_core.config import parse_spec
    from tdml_core.runtime.context import check_shards, round_batches

    ds = load_dataset(DatasetSpec(name="digits"), seed=0)
    x, y = ds.train_x[:330], ds.train_y[:330]  # 10 batches of 32
    one = parse_spec({"batch_size": 32, "microbatches": 4})
    three = parse_spec({"batch_size": 32, "microbatches": 4, "rounds_per_epoch": 3, "epochs": 2})
    assert three.rounds == 6
    for epoch in range(2):
        whole = round_batches(one, x, y, epoch, pipeline=1)
        parts = [round_batches(three, x, y, 3 * epoch + r, pipeline=1) for r in range(3)]
        assert [len(p) for p in parts] == [3, 3, 4]
        joined = [b for p in parts for b in p]
        assert len(joined) == len(whole) == 10
        assert all((a[1] == b[1]).all() and (a[0] == b[0]).all() for a, b in zip(joined, whole))
    assert not all((a[1] == b[1]).all() for a, b in zip(round_batches(three, x, y, 0, 1), round_batches(three, x, y, 3, 1)))
    check_shards(three, 2 * 96)  # 3 batches a shard: one a round
    with pytest.raises(Exception, match="rounds_per_epoch \\(3\\) is more than a pipeline's shard has batches"):
        check_shards(three, 2 * 95)


def _write_cifar(folder, per_batch=20):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, fh)


def test_cifar10_from_a_local_folder(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    ds = load_dataset(DatasetSpec(name="cifar10", path=tmp_path), seed=0)
    assert ds.train_x.shape == (85, 3, 32, 32) and ds.val_x.shape == (15, 3, 32, 32)
    assert ds.test_x.shape == (20, 3, 32, 32)
    assert ds.num_classes == 10
    assert abs(float(ds.train_x.mean())) < 1.0  # normalised, not raw bytes


def test_cifar10_missing_files_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="holds no CIFAR-10 python batches"):
        load_dataset(DatasetSpec(name="cifar10", path=tmp_path), seed=0)
    _write_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset(DatasetSpec(name="cifar10", path=tmp_path / "c"), seed=0)


def test_synthetic_is_learnable_shape():
    spec = DatasetSpec(name="synthetic", synthetic={"samples": 500, "shape": (3, 4, 4), "classes": 5})
    ds = load_dataset(spec, seed=3)
    assert ds.train_x.shape[1:] == (3, 4, 4) and ds.num_classes == 5
    assert len(ds.train_y) + len(ds.val_y) + len(ds.test_y) == 500


def test_every_set_has_the_row_major_strides_of_a_tensor_read_back_from_the_store():
    """A size-1 channel with NumPy's stride reads as channels-last and takes another convolution kernel."""
    from tdml_core.artifacts import state_bytes, state_from_bytes

    ds = load_dataset(DatasetSpec(name="digits"), seed=0)
    for x in (ds.train_x, ds.val_x, ds.test_x):
        assert x.stride() == (64, 64, 8, 1) == state_from_bytes(state_bytes({"x": x}))["x"].stride()
