"""Reference points on the same data split: one node, and FedAvg (through the spec's outer optimizer)."""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from tdml_core.config import JobSpec
from tdml_core.data import batches, shard
from tdml_core.robust.aggregate import average_states
from tdml_core.runtime.context import epoch_seed, load_job, make_optimizer, round_batches
from tdml_core.runtime.engine import EpochCallback, RunResult, cross_validate, global_record, local_records


def local_epoch(model: nn.Module, opt, todo) -> float:
    """Plain (unsplit) training on the batches ``todo``; the mean batch loss."""
    model.train()
    total, n = 0.0, 0
    for xb, yb in todo:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        total += float(loss.detach())
        n += 1
    return total / max(n, 1)


def single_node(spec: JobSpec, on_epoch: EpochCallback | None = None) -> RunResult:
    """The whole training set on one process, no split, no averaging."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ds, model = load_job(spec)
    opt = make_optimizer(spec, model.parameters())
    result = RunResult(mode="single", plan=None)
    for epoch in range(spec.epochs):
        te = time.perf_counter()
        train_loss = local_epoch(model, opt, batches(ds.train_x, ds.train_y, spec.batch_size, epoch_seed(spec, epoch, 0)))
        rec = global_record(epoch, model, ds, [], te)
        rec["train_loss"] = train_loss
        result.epochs.append(rec)
        if on_epoch:
            on_epoch(rec)
    result.global_state = model.state_dict()
    result.wall_s = time.perf_counter() - t0
    return result


def fedavg(spec: JobSpec, on_epoch: EpochCallback | None = None) -> RunResult:
    """``data_parallel`` clients on the same shards; every round (``rounds_per_epoch`` an epoch) all are averaged.

    The average moves the global model through the spec's outer optimizer (plain
    averaging by default; with Nesterov momentum it is DiLoCo without the pipelines).
    """
    from tdml_core.robust.outer import step_by

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ds, model = load_job(spec)
    n = spec.data_parallel
    shards = [shard(ds, p, n, spec.seed) for p in range(n)]
    clients = [copy.deepcopy(model) for _ in range(n)]
    opts = [make_optimizer(spec, c.parameters()) for c in clients]
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    result = RunResult(mode="fedavg", plan=None)
    agg, buffer = spec.aggregation, None
    for epoch in range(spec.rounds):
        te = time.perf_counter()
        losses = []
        for p, (client, opt, (x, y)) in enumerate(zip(clients, opts, shards)):
            client.load_state_dict(global_state)
            losses.append(local_epoch(client, opt, round_batches(spec, x, y, epoch, p)))
        states = [{k: v.detach().clone() for k, v in c.state_dict().items()} for c in clients]
        scores = cross_validate(model, states, ds)
        global_state, buffer = step_by(agg, global_state, average_states(states), buffer)
        model.load_state_dict(global_state)
        rec = global_record(epoch, model, ds, local_records(scores, losses, list(range(n))), te)
        result.epochs.append(rec)
        if on_epoch:
            on_epoch(rec)
    result.global_state = global_state
    result.wall_s = time.perf_counter() - t0
    return result
