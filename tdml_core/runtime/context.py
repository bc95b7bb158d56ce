"""What every participant derives the same way from a job spec: data, model, plan, optimizer."""

from __future__ import annotations

import torch
from torch import nn

from tdml_core.config import JobSpec, SpecError
from tdml_core.data import Dataset, batches, load_dataset
from tdml_core.model import BYTES_PER_VALUE, OPTIMIZER_STATES, StagePlan, build_model, plan_stages


def example_microbatch(ds: Dataset, spec: JobSpec) -> torch.Tensor:
    return ds.train_x[: spec.microbatch_size].clone()


def model_for(spec: JobSpec, num_classes: int, example: torch.Tensor) -> nn.Module:
    """The job's model with its seeded initial weights, shaped by the classes and an input batch."""
    return build_model(spec.model, num_classes, int(example.shape[1]), example[: spec.microbatch_size].clone(),
                       spec.seed, spec.model_args)


def new_model(spec: JobSpec, ds: Dataset) -> nn.Module:
    """The job's model with its seeded initial weights (the epoch-0 global model)."""
    return model_for(spec, ds.num_classes, example_microbatch(ds, spec))


def make_plan(spec: JobSpec, model: nn.Module, ds: Dataset | torch.Tensor) -> StagePlan:
    """The stage plan; ``ds`` is the dataset or any input batch (only shapes matter)."""
    example = ds[: spec.microbatch_size] if isinstance(ds, torch.Tensor) else example_microbatch(ds, spec)
    return plan_stages(
        model,
        example,
        None if spec.stages == "auto" else spec.stages,
        spec.trainers or None,
        bytes_per_value=BYTES_PER_VALUE[spec.precision],
        optimizer_states=OPTIMIZER_STATES[spec.optimizer],
    )


def make_optimizer(spec: JobSpec, params) -> torch.optim.Optimizer:
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def epoch_seed(spec: JobSpec, epoch: int, pipeline: int) -> int:
    """Batch order of one pipeline in one epoch: the same on all of its stages."""
    return spec.seed * 1_000_003 + epoch * 1009 + pipeline


def round_batches(spec: JobSpec, x: torch.Tensor, y: torch.Tensor, rnd: int, pipeline: int) -> list:
    """The batches one pipeline trains in protocol round ``rnd``: part ``rnd % R`` of data epoch ``rnd // R``.

    An epoch's batches (its seeded order, ``data.batches``) are cut into
    ``rounds_per_epoch`` contiguous parts of sizes that differ by at most one, so the
    rounds of an epoch together train every batch of it once.
    """
    epoch, part = divmod(rnd, spec.rounds_per_epoch)
    every = list(batches(x, y, spec.batch_size, epoch_seed(spec, epoch, pipeline)))
    n, r = len(every), spec.rounds_per_epoch
    return every[part * n // r:(part + 1) * n // r]


def check_shards(spec: JobSpec, n_train: int) -> None:
    """Every pipeline's shard (``data.shard``) must hold a full batch for every round, or a round trains on nothing."""
    smallest = n_train // spec.data_parallel  # np.array_split: shards differ by at most one sample
    if smallest < spec.batch_size:
        raise SpecError(
            f"batch_size ({spec.batch_size}) is larger than a pipeline's shard: {n_train} training samples "
            f"/ data_parallel ({spec.data_parallel}) = {smallest} sample{'' if smallest == 1 else 's'} per shard; "
            f"lower batch_size or data_parallel"
        )
    if smallest // spec.batch_size < spec.rounds_per_epoch:
        raise SpecError(
            f"rounds_per_epoch ({spec.rounds_per_epoch}) is more than a pipeline's shard has batches "
            f"({smallest} samples / batch_size {spec.batch_size} = {smallest // spec.batch_size}); "
            f"lower rounds_per_epoch or batch_size"
        )


def load_job(spec: JobSpec) -> tuple[Dataset, nn.Module]:
    """The job's dataset and its seeded initial model; a spec the data cannot serve is refused here."""
    ds = load_dataset(spec.dataset, spec.seed)
    check_shards(spec, len(ds.train_y))
    return ds, new_model(spec, ds)
