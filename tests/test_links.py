"""Sealed links between pipeline neighbours: what passes is AES-256-GCM, and a bad message is refused by name."""

import os

import pytest
import torch

from tdml_core.config import parse_spec
from tdml_core.runtime.cluster import PipelineCluster, StageFailure
from tdml_core.runtime.context import load_job, make_plan
from tdml_core.runtime.link import OVERHEAD, LinkError, Links, seed_link_key


def _pair(job="job-7", pipeline=1):
    keys = {(s, d): seed_link_key(0, job, pipeline, s, d) for s, d in ((0, 1), (1, 0))}
    return Links(job, pipeline, 0, keys), Links(job, pipeline, 1, keys)


def _send(sender: Links, receiver: Links, tensors):
    """Seal each tensor on the sender; post its receive on the receiver; the wire copies and what to open."""
    out = []
    for i, t in enumerate(tensors):
        wire = sender.seal(t, 1, ("fwd", i, 0)).clone()
        buf, want = receiver.receive_buffer(t, 0, ("fwd", i, 0))
        out.append((wire, buf, want))
    return out


def test_a_sealed_activation_opens_to_the_same_bits_and_its_bytes_never_appear_on_the_wire():
    a, b = _pair()
    x = torch.randn(64, 128)
    (wire, buf, want), = _send(a, b, [x])
    assert wire.numel() == x.numel() * 4 + OVERHEAD
    raw = x.numpy().tobytes()
    assert raw[:64] not in bytes(wire.numpy()) and raw[1000:1064] not in bytes(wire.numpy())
    buf.copy_(wire)
    got = torch.empty_like(x)
    b.open(buf, got, 0, want)
    assert torch.equal(got, x)


def test_a_tampered_replayed_or_reordered_message_is_refused_naming_the_senders_slot():
    a, b = _pair()
    xs = [torch.full((8,), float(i)) for i in range(3)]
    sent = _send(a, b, xs)
    (w0, b0, n0), (w1, b1, n1), (w2, b2, n2) = sent
    got = torch.empty(8)

    b0.copy_(w0)
    b.open(b0, got, 0, n0)
    assert torch.equal(got, xs[0])

    b1.copy_(w0)  # the first message again in the second's place
    with pytest.raises(LinkError, match=r"from 1/0 to 1/1 was replayed \(counter 0"):
        b.open(b1, got, 0, n1)
    b1.copy_(w2)  # the third before the second
    with pytest.raises(LinkError, match=r"from 1/0 to 1/1 arrived out of order \(counter 2, expected 1"):
        b.open(b1, got, 0, n1)
    bad = w1.clone()
    bad[20] ^= 1  # one bit of the ciphertext
    b1.copy_(bad)
    with pytest.raises(LinkError, match=r"from 1/0 to 1/1 was tampered with \(counter 1"):
        b.open(b1, got, 0, n1)
    b1.copy_(w1)
    b.open(b1, got, 0, n1)  # the genuine one still opens
    assert torch.equal(got, xs[1])


def test_a_message_sealed_for_another_job_pipeline_or_direction_does_not_open():
    x = torch.randn(16)
    a, _ = _pair(job="job-7", pipeline=1)
    wire = a.seal(x, 1, ("fwd", 0, 0)).clone()
    for other in (_pair(job="job-8")[1], _pair(pipeline=2)[1]):
        buf, want = other.receive_buffer(x, 0, ("fwd", 0, 0))
        buf.copy_(wire)
        with pytest.raises(LinkError, match="tampered with"):
            other.open(buf, torch.empty_like(x), 0, want)
    # the reverse direction's key: a stage's own message reflected back to it
    back = Links("job-7", 1, 0, {(s, d): seed_link_key(0, "job-7", 1, s, d) for s, d in ((0, 1), (1, 0))})
    buf, want = back.receive_buffer(x, 1, ("bwd", 0, 0))
    buf.copy_(wire)
    with pytest.raises(LinkError, match="from 1/1 to 1/0 was tampered with"):
        back.open(buf, torch.empty_like(x), 1, want)


def _spec(**kw):
    data = {"data_parallel": 2, "top_k": 1, "batch_size": 12, "microbatches": 3, "epochs": 1, "stages": 2,
            "dataset": {"name": "digits", "limit": 200}}
    data.update(kw)
    return parse_spec(data)


def test_sealed_and_plain_links_train_the_same_weights():
    """Sealing is lossless: a pipeline epoch over sealed links ends in the same weights, bit for bit."""
    states = {}
    for links in ("sealed", "plain"):
        spec = _spec(protocol={"links": links})
        ds, model = load_job(spec)
        plan = make_plan(spec, model, ds)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with PipelineCluster(spec, plan, pipelines=1) as cluster:
            states[links] = cluster.train_epoch(0, state)[0]["state"]
    assert states["sealed"].keys() == states["plain"].keys()
    assert all(torch.equal(states["sealed"][k], states["plain"][k]) for k in states["plain"])


@pytest.mark.parametrize("how, says", [("tamper", "was tampered with"), ("replay", "was replayed"),
                                       ("reorder", "arrived out of order")])
def test_the_receiving_stage_process_refuses_a_bad_message_from_its_neighbour(how, says, monkeypatch):
    """Inside real stage processes: stage 0/0's second message is spoiled on its way; stage 0/1 refuses it."""
    monkeypatch.setenv("TDML_TEST_LINK", f"0/0:{how}")
    spec = _spec()
    ds, model = load_job(spec)
    plan = make_plan(spec, model, ds)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with PipelineCluster(spec, plan, pipelines=1) as cluster:
        with pytest.raises(StageFailure) as failed:
            cluster.train_epoch(0, state)
    assert (failed.value.pipeline, failed.value.stage) == (0, 1)
    assert f"LinkError: a message from 0/0 to 0/1 {says}" in str(failed.value)
