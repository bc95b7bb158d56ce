"""The training engine: pipelines train, local models are cross-validated and combined, the outer step taken.

``train`` is the local dry run (no chain, no storage). The protocol runs the
same steps one at a time through ``PipelineCluster`` and the functions of
``tdml_core.robust``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tdml_core.config import JobSpec
from tdml_core.model import StagePlan
from tdml_core.robust.combine import combine
from tdml_core.robust.outer import step_by
from tdml_core.robust.validate import evaluate
from tdml_core.runtime.cluster import PipelineCluster
from tdml_core.runtime.context import load_job, make_plan


@dataclass
class RunResult:
    mode: str
    plan: StagePlan | None
    epochs: list[dict] = field(default_factory=list)
    global_state: dict | None = None
    wall_s: float = 0.0
    startup_s: float = 0.0

    @property
    def final_accuracy(self) -> float:
        return self.epochs[-1]["global_accuracy"] if self.epochs else float("nan")


EpochCallback = Callable[[dict], None]


def cross_validate(model, states: list[dict], ds) -> list[tuple[float, float]]:
    """(accuracy, loss) of each local model on the validation set (never the test set)."""
    scores = []
    for state in states:
        model.load_state_dict(state)
        scores.append(evaluate(model, ds.val_x, ds.val_y))
    return scores


def global_record(epoch: int, model, ds, local: list[dict], started: float) -> dict:
    """One epoch's row: the global model on the test set (reported) and on the validation set (what scored it).

    ``wall_s`` runs from ``started`` (the epoch's ``time.perf_counter()``) to after that scoring, as a flow's epoch does."""
    acc, loss = evaluate(model, ds.test_x, ds.test_y)
    val_acc, val_loss = evaluate(model, ds.val_x, ds.val_y)
    return {"epoch": epoch, "global_accuracy": acc, "global_loss": loss, "global_val_accuracy": val_acc,
            "global_val_loss": val_loss, "local": local, "wall_s": time.perf_counter() - started}


def local_records(scores: list[tuple[float, float]], train_losses: list, chosen: list[int]) -> list[dict]:
    """One summary row per pipeline's local model."""
    return [
        {"pipeline": p, "accuracy": acc, "loss": loss, "train_loss": tl, "selected": p in chosen}
        for p, ((acc, loss), tl) in enumerate(zip(scores, train_losses))
    ]


def train(spec: JobSpec, on_epoch: EpochCallback | None = None) -> RunResult:
    """Pipeline × data-parallel training of ``spec`` across real processes."""
    t0 = time.perf_counter()
    ds, model = load_job(spec)
    plan = make_plan(spec, model, ds)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = RunResult(mode="tdml", plan=plan)
    agg, buffer = spec.aggregation, None
    with PipelineCluster(spec, plan) as cluster:
        result.startup_s = time.perf_counter() - t0
        for epoch in range(spec.rounds):  # a protocol round each (``rounds_per_epoch`` to an epoch)
            te = time.perf_counter()
            locals_ = cluster.train_epoch(epoch, global_state)
            states = [lc["state"] for lc in locals_]
            scores = cross_validate(model, states, ds)
            combined, chosen, _ = combine(agg.rule, global_state, states, [acc for acc, _ in scores],
                                          list(range(len(states))), top_k=spec.top_k, f=agg.f, tau=agg.tau,
                                          iters=agg.iters)
            global_state, buffer = step_by(agg, global_state, combined, buffer)
            model.load_state_dict(global_state)
            record = global_record(epoch, model, ds, local_records(scores, [lc["train_loss"] for lc in locals_],
                                                                    chosen), te)
            result.epochs.append(record)
            if on_epoch:
                on_epoch(record)
    result.global_state = global_state
    result.wall_s = time.perf_counter() - t0
    return result
