"""Pipelines of real stage processes over torch.distributed (gloo)."""

import os
import signal
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from tdml_core.config import parse_spec
from tdml_core.data import shard
from tdml_core.runtime.cluster import PipelineCluster, StageFailure
from tdml_core.runtime.context import load_job, make_plan

MODELS = {
    "digits_cnn": {"model": "digits_cnn", "stages": 2},
    "resnet18": {
        "model": "resnet18",
        "stages": 3,
        "dataset": {"name": "synthetic", "synthetic": {"samples": 80, "shape": [3, 16, 16], "classes": 10}},
    },
    "residual": {"model": "tests.models:residual_mlp", "stages": 3},
}


def _spec(extra: dict, **kw):
    data = {"data_parallel": 2, "top_k": 1, "batch_size": 12, "microbatches": 3, "epochs": 1}
    data.update(extra)
    data.update(kw)
    return parse_spec(data)


def _reference_grads(model, xb, yb, n_micro):
    """The unsplit model, microbatch by microbatch, gradients averaged as the schedule does."""
    model.train()
    model.zero_grad()
    for mx, my in zip(xb.chunk(n_micro), yb.chunk(n_micro)):
        (F.cross_entropy(model(mx), my) / n_micro).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("name", MODELS)
def test_pipeline_gradients_equal_the_unsplit_model(name, schedule):
    spec = _spec(MODELS[name], schedule=schedule)
    ds, model = load_job(spec)
    plan = make_plan(spec, model, ds)
    assert plan.n_stages == spec.stages
    state = {k: v.clone() for k, v in model.state_dict().items()}
    xb, yb = ds.train_x[: spec.batch_size], ds.train_y[: spec.batch_size]

    with PipelineCluster(spec, plan, pipelines=1) as cluster:
        grads, losses = cluster.batch_grads(0, state, xb, yb)

    expected = _reference_grads(model, xb, yb, spec.microbatches)
    assert set(grads) == set(expected)
    worst = max((grads[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= 1e-5, f"max abs gradient difference {worst}"
    assert len(losses) == spec.microbatches


def test_a_killed_stage_fails_the_epoch_naming_it():
    spec = _spec(
        {"model": "digits_cnn", "stages": 2},
        data_parallel=2,
        top_k=1,
        dataset={"name": "synthetic", "synthetic": {"samples": 40000, "shape": [1, 8, 8], "classes": 10}},
    )
    ds, model = load_job(spec)
    plan = make_plan(spec, model, ds)
    state = model.state_dict()
    with PipelineCluster(spec, plan) as cluster:
        victim = cluster.pid(1, 0)
        killer = threading.Timer(1.5, os.kill, (victim, signal.SIGKILL))
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(StageFailure) as err:
            cluster.train_epoch(0, state)
        elapsed = time.monotonic() - t0
        killer.join()
    assert err.value.pipeline == 1 and err.value.stage == 0
    assert "pipeline 1 stage 0: process was killed by SIGKILL during epoch 0" in str(err.value)
    print(f"stage failure reported {elapsed - 1.5:.2f} s after the kill")


def test_shards_differ_between_pipelines():
    spec = _spec({"model": "digits_cnn"}, data_parallel=2)
    ds, _ = load_job(spec)
    (x0, _), (x1, _) = shard(ds, 0, 2, spec.seed), shard(ds, 1, 2, spec.seed)
    assert len(x0) + len(x1) == len(ds.train_y)
    assert not torch.equal(x0[:10], x1[:10])


def test_a_reset_runs_the_new_attacks_and_a_replacement_trains_honestly():
    """The engine alone (as bench/detection.py drives it): a sign_flip trainer in its own stage process."""
    from tdml_core.config import AttackSpec

    spec = _spec({"model": "digits_cnn", "stages": 2}, data_parallel=2, top_k=2)
    ds, model = load_job(spec)
    plan = make_plan(spec, model, ds)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(out, p, s):
        return {k: v - start[k] for k, v in out[p]["stages"][s].items() if v.is_floating_point()}

    with PipelineCluster(spec, plan) as cluster:
        honest = cluster.train_epoch(0, start)
        cluster.reset([AttackSpec(slot="1/1", kind="sign_flip")])
        attacked = cluster.train_epoch(0, start)
        cluster.reset([AttackSpec(slot="1/1", kind="sign_flip")])  # every optimizer fresh again
        cluster.replace([(1, 1)])
        replaced = cluster.train_epoch(0, start)
    h, a, r = update(honest, 1, 1), update(attacked, 1, 1), update(replaced, 1, 1)
    assert any(float(v.abs().max()) > 0 for v in h.values())
    for k in h:  # the attacker committed minus its honest update, its neighbours trained as before
        torch.testing.assert_close(a[k], -h[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r[k], h[k], rtol=1e-5, atol=1e-6)  # fresh optimizer, no attack
    for k, v in update(honest, 0, 1).items():
        torch.testing.assert_close(update(attacked, 0, 1)[k], v, rtol=1e-5, atol=1e-6)
