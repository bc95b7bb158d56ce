import pickle

import numpy as np
import pytest

from tdml_core.config import DatasetSpec
from tdml_core.data import DatasetError, batches, load_dataset, shard_indices


def test_digits_is_shipped_and_split_stratified():
    ds = load_dataset(DatasetSpec(name="digits"), seed=0)
    assert ds.train_x.shape[1:] == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.train_y) + len(ds.test_y) == 1797
    assert len(ds.test_y) == 360
    assert set(ds.test_y.tolist()) == set(range(10))
    again = load_dataset(DatasetSpec(name="digits"), seed=0)
    assert (again.test_y == ds.test_y).all()


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
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.test_x.shape == (20, 3, 32, 32)
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
    assert len(ds.train_y) + len(ds.test_y) == 500
