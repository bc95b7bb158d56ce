"""Datasets, their three disjoint sets, and the training set's deterministic sharding.

Every dataset is cut three ways: the training set (sharded over the pipelines), the
validation set carved from the client's training data (it scores the local models:
cross-validation, top-K selection and detection see only it), and the test set that
every reported accuracy comes from and that nothing in training, selection, detection
or aggregation ever sees.

- digits: scikit-learn's 8x8 handwritten digits (shipped with the package, no download)
- cifar10: read from a local folder in the standard python-pickle layout
- synthetic: class-dependent Gaussian images for scale tests
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from tdml_core.config import DatasetSpec

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class DatasetError(ValueError):
    pass


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    val_x: torch.Tensor  # scores local models (cross-validation, selection, detection)
    val_y: torch.Tensor

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    classes = int((counts > 0).sum())
    n_test = int(np.ceil(len(y) * test_fraction))
    # stratified when every class can give a sample to each side (scikit-learn's condition), else random
    stratify = y if counts[counts > 0].min() >= 2 and min(n_test, len(y) - n_test) >= classes else None
    return train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=stratify)


def _digits(spec: DatasetSpec, seed: int):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    tx, vx, ty, vy = _split(x, bunch.target.astype(np.int64), spec.test_fraction, seed)
    return tx, ty, vx, vy, 10


def _cifar_folder(path: Path) -> Path:
    for candidate in (path, path / "cifar-10-batches-py"):
        if (candidate / "test_batch").is_file():
            return candidate
    raise DatasetError(
        f"{path} holds no CIFAR-10 python batches: expected data_batch_1..5 and test_batch "
        "(the 'CIFAR-10 python version' layout), here or in cifar-10-batches-py/"
    )


def _cifar_batch(file: Path):
    if not file.is_file():
        raise DatasetError(f"CIFAR-10 file missing: {file}")
    with file.open("rb") as fh:
        try:
            d = pickle.load(fh, encoding="bytes")
        except Exception as exc:
            raise DatasetError(f"{file} is not a CIFAR-10 python batch ({exc})") from None
    data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    return data, labels


def _cifar10(spec: DatasetSpec, seed: int):
    folder = _cifar_folder(Path(spec.path))
    parts = [_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    tx = np.concatenate([p[0] for p in parts])
    ty = np.concatenate([p[1] for p in parts])
    vx, vy = _cifar_batch(folder / "test_batch")
    mean = np.asarray(CIFAR_MEAN, dtype=np.float32)[None, :, None, None]
    std = np.asarray(CIFAR_STD, dtype=np.float32)[None, :, None, None]

    def norm(a):
        return ((a.astype(np.float32) / 255.0) - mean) / std

    return norm(tx), ty, norm(vx), vy, 10


def _synthetic(spec: DatasetSpec, seed: int):
    s = spec.synthetic
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(0, 1, size=(s.classes, *s.shape)).astype(np.float32)
    y = rng.integers(0, s.classes, size=s.samples)
    x = prototypes[y] + rng.normal(0, 1.5, size=(s.samples, *s.shape)).astype(np.float32)
    tx, vx, ty, vy = _split(x, y.astype(np.int64), spec.test_fraction, seed)
    return tx, ty, vx, vy, s.classes


_LOADERS = {"digits": _digits, "cifar10": _cifar10, "synthetic": _synthetic}


def _tensor(a: np.ndarray) -> torch.Tensor:
    """Row-major strides, exactly as a tensor read back from the store has them.

    NumPy gives a size-1 dimension whatever stride its history left (digits' one channel
    came out with stride 1), and PyTorch reads such a batch as channels-last and takes
    another convolution kernel: results a few ulps apart that grow over epochs, between a
    stage that got its shard from the store and one that did not, and between a trainer
    and the verifier that replays it.
    """
    return torch.from_numpy(np.ascontiguousarray(a)).clone(memory_format=torch.contiguous_format)


def load_dataset(spec: DatasetSpec, seed: int = 0) -> Dataset:
    """The training, validation and test sets, as float32 / int64 tensors.

    The validation set is ``validation_fraction`` of the training data, stratified,
    carved before ``limit`` so that it does not shrink with it.
    """
    tx, ty, test_x, test_y, classes = _LOADERS[spec.name](spec, seed)
    if len(ty) * spec.validation_fraction < 1 or len(ty) * (1 - spec.validation_fraction) < 1:
        raise DatasetError(f"validation_fraction {spec.validation_fraction} of {len(ty)} training samples "
                           "leaves no sample on one side")
    tx, val_x, ty, val_y = _split(tx, ty, spec.validation_fraction, seed + 1)
    if spec.limit is not None:
        tx, ty = tx[: spec.limit], ty[: spec.limit]
    return Dataset(name=spec.name, train_x=_tensor(tx), train_y=_tensor(ty), test_x=_tensor(test_x),
                   test_y=_tensor(test_y), num_classes=classes, val_x=_tensor(val_x), val_y=_tensor(val_y))


def shard_indices(n: int, n_shards: int, seed: int) -> list[np.ndarray]:
    """Split ``range(n)`` into ``n_shards`` disjoint, near-equal, seeded-random shards."""
    if n_shards < 1 or n_shards > n:
        raise DatasetError(f"cannot cut {n} samples into {n_shards} shards")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, n_shards)]


def shard(ds: Dataset, index: int, n_shards: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.from_numpy(shard_indices(len(ds.train_y), n_shards, seed)[index])
    return ds.train_x[idx], ds.train_y[idx]


def num_batches(n: int, batch_size: int) -> int:
    return n // batch_size


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Full batches in a seeded order; the remainder is dropped so every batch splits evenly."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    for b in range(num_batches(len(y), batch_size)):
        idx = order[b * batch_size : (b + 1) * batch_size]
        yield x[idx], y[idx]
