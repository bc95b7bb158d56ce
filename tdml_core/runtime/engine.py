"""The training engine: pipelines train, local models are cross-validated, top-K averaged.

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
from tdml_core.robust.aggregate import top_k_average
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
    """(accuracy, loss) of each local model on the test set."""
    scores = []
    for state in states:
        model.load_state_dict(state)
        scores.append(evaluate(model, ds.test_x, ds.test_y))
    return scores


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
    with PipelineCluster(spec, plan) as cluster:
        result.startup_s = time.perf_counter() - t0
        for epoch in range(spec.epochs):
            te = time.perf_counter()
            locals_ = cluster.train_epoch(epoch, global_state)
            scores = cross_validate(model, [lc["state"] for lc in locals_], ds)
            global_state, chosen = top_k_average(
                [lc["state"] for lc in locals_], [acc for acc, _ in scores], spec.top_k
            )
            model.load_state_dict(global_state)
            g_acc, g_loss = evaluate(model, ds.test_x, ds.test_y)
            record = {
                "epoch": epoch,
                "global_accuracy": g_acc,
                "global_loss": g_loss,
                "local": local_records(scores, [lc["train_loss"] for lc in locals_], chosen),
                "wall_s": time.perf_counter() - te,
            }
            result.epochs.append(record)
            if on_epoch:
                on_epoch(record)
    result.global_state = global_state
    result.wall_s = time.perf_counter() - t0
    return result
