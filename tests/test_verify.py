"""Verification of trainers' compute: records, Merkle proofs, challenges, recomputation."""

import os

import pytest
import torch

from tdml_core.attacks import Tamper
from tdml_core.config import parse_spec
from tdml_core.runtime.cluster import PipelineCluster
from tdml_core.runtime.context import load_job, make_plan
from tdml_core.verify import challenge, merkle
from tdml_core.verify.recompute import relative_diff
from tdml_core.verify.referee import Referee, slot_records


def test_every_leaf_proves_against_the_root_and_no_other_leaf_does():
    for n in (1, 2, 3, 5, 8, 13):
        leaves = [merkle.leaf_hash(bytes([i]) * 4) for i in range(n)]
        root = merkle.root(leaves)
        for i in range(n):
            path = merkle.proof(leaves, i)
            assert merkle.verify(leaves[i], i, n, path, root)
            if n > 1:
                assert not merkle.verify(leaves[(i + 1) % n], i, n, path, root)
                assert not merkle.verify(leaves[i], (i + 1) % n, n, path, root)
        assert not merkle.verify(leaves[0], 0, n, merkle.proof(leaves, 0), merkle.leaf_hash(b"other"))
    # two leaves hash to the documented RFC 6962 root
    a, b = merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")
    import hashlib
    assert merkle.root([a, b]) == hashlib.sha256(b"\x01" + a + b).digest()


def test_challenges_are_distinct_include_the_last_step_and_follow_the_seed():
    segments = challenge.pick(b"block-hash", "0/1", 100, 10, every=4)  # 3 segments' worth and the last
    assert len(segments) == 4 and all(s % 4 == 0 for s in segments) and segments[-1] == 96
    assert challenge.pick(b"block-hash", "0/1", 10, 66, every=4) == [0, 4, 8]
    steps = challenge.pick(b"block-hash", "0/1", 100, 10)
    assert len(steps) == 11 and len(set(steps)) == 11 and steps[-1] == 99
    assert steps == challenge.pick(b"block-hash", "0/1", 100, 10)
    assert steps != challenge.pick(b"other-hash", "0/1", 100, 10)
    assert steps != challenge.pick(b"block-hash", "1/1", 100, 10)
    assert challenge.pick(b"s", "0/0", 5, 66) == [0, 1, 2, 3, 4]
    assert challenge.pick(b"s", "0/0", 0, 3) == []


def test_a_lazy_trainer_skips_its_share_of_steps():
    m = torch.nn.Linear(2, 2)
    tamper = Tamper(m, first=True, last=False)
    from tdml_core.config import AttackSpec
    tamper.begin_epoch(AttackSpec(slot="0/0", kind="lazy", q=0.25), 40, torch.Generator().manual_seed(1))
    assert sum(tamper.begin_step(t) for t in range(40)) == 10
    tamper.begin_epoch(None, 40, torch.Generator())
    assert not any(tamper.begin_step(t) for t in range(40))


def test_relative_difference():
    b = torch.tensor([1.0, -2.0])
    assert relative_diff(b + torch.tensor([0.0, 0.2]), b) == pytest.approx(0.1)
    assert relative_diff(torch.ones(3), torch.ones(2)) == float("inf")
    assert relative_diff(torch.tensor([1, 2]), torch.tensor([1, 2])) == 0.0


def _stored(reveals: dict) -> dict:
    """Each reveal as a trainer puts it into the store and its referee reads it back."""
    from tdml_core.verify.records import reveal_bytes, reveal_from_bytes

    return {slot: reveal_from_bytes(reveal_bytes(r)) for slot, r in reveals.items()}


def _run_and_judge(spec, epochs=1, checks=None, stored=False, who=None):
    ds, model = load_job(spec)
    plan = make_plan(spec, model, ds)
    ref = Referee(spec, plan, ds)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    verdicts = []
    with PipelineCluster(spec, plan) as cluster:
        for epoch in range(epochs):
            out = cluster.train_epoch(epoch, state)
            records = slot_records(out, cluster.pipeline_ids)
            steps = ref.challenges(os.urandom(32), records)
            reveals = _stored(cluster.reveal(steps)) if stored else cluster.reveal(steps)
            verdicts.append(ref.judge(epoch, records, steps, reveals))
            if who is not None:
                verdicts.append(ref.judge(epoch, records, steps, reveals, who))
    return verdicts


def test_forged_messages_are_pinned_on_their_sender_and_not_on_the_receiver():
    spec = parse_spec({"data_parallel": 2, "stages": 2, "batch_size": 32, "microbatches": 4, "epochs": 1,
                       "dataset": {"name": "digits", "limit": 512}, "verification": {"checks": 3, "checkpoint_every": 1},
                       "attacks": [{"slot": "0/0", "kind": "forged_output"},
                                   {"slot": "1/1", "kind": "forged_grad"}]})
    (verdicts,) = _run_and_judge(spec, stored=True)  # through the store's byte format, as the protocol reads them
    assert {slot for slot, v in verdicts.items() if v.failed} == {(0, 0), (1, 1)}
    assert verdicts[(0, 0)].first_failure.what == "outputs"
    assert verdicts[(1, 1)].first_failure.what == "grads_out"
    for slot in ((0, 1), (1, 0)):  # each received the forged values and computed honestly from them
        # bit for bit: the datasets' tensors have the row-major strides of what comes back from the store
        assert all(f.ok and f.max_diff == 0.0 for f in verdicts[slot].findings), verdicts[slot].as_doc()
        assert len(verdicts[slot].steps) == 4  # three random steps and the last


def test_a_forger_whose_records_hold_honest_values_is_pinned_by_the_signature_it_gave():
    spec = parse_spec({"data_parallel": 2, "stages": 2, "batch_size": 32, "microbatches": 4, "epochs": 1,
                       "dataset": {"name": "digits", "limit": 512}, "verification": {"checks": 3},
                       "attacks": [{"slot": "0/0", "kind": "forged_output", "hidden": True},
                                   {"slot": "1/1", "kind": "forged_grad", "hidden": True}]})
    stranger = "0x" + "11" * 20
    plain, named = _run_and_judge(spec, who={(1, 0): stranger})
    assert {slot for slot, v in plain.items() if v.failed} == {(0, 0), (1, 1)}
    for slot in ((0, 0), (1, 1)):  # its own replay agrees with its records; its neighbour's signed copy does not
        v = plain[slot]
        assert all(f.ok for f in v.findings[:len(v.steps)]), v.as_doc()
        signed = [f for f in v.findings[len(v.steps):]]
        assert signed and all(f.what == "signed" and not f.ok for f in signed), v.as_doc()
        assert set(v.steps) <= {f.step for f in signed}  # every challenged step shows it
    for slot in ((0, 1), (1, 0)):
        assert not plain[slot].failed, plain[slot].as_doc()
    # what 1/1 received must be signed by the trainer the chain names at 1/0: signed by another, it is refused
    assert named[(1, 1)].first_failure.what == "signature"
    assert "from stage 0" in named[(1, 1)].first_failure.detail


def test_honest_trainers_of_a_three_stage_residual_model_pass_under_1f1b():
    spec = parse_spec({"model": "tests.models:residual_mlp", "stages": 3, "schedule": "1f1b",
                       "data_parallel": 2, "top_k": 1, "batch_size": 24, "microbatches": 3, "epochs": 1,
                       "dataset": {"name": "digits", "limit": 240},
                       "verification": {"checks": 2, "checkpoint_every": 3}})
    for verdicts in _run_and_judge(spec, epochs=1):
        assert len(verdicts) == 6
        for v in verdicts.values():
            assert not v.failed, v.as_doc()
            assert all(f.segment[1] - f.segment[0] in (1, 2, 3) for f in v.findings)


def test_a_fraud_proof_convicts_the_forger_and_clears_its_pipeline_neighbour():
    from tdml_core.verify import proofs

    def verdict(slot, flagged=False, malicious=False):
        return {"slot": slot, "trainer": slot, "flagged": flagged, "malicious": malicious, "reason": "clean"}

    doc = {"flagged": [True, False], "verdicts": [verdict("0/0"), verdict("0/1", True, True), verdict("1/0"),
                                                  verdict("1/1", True, False)]}
    failed = {"step": 7, "ok": False, "what": "outputs", "detail": "the activations sent differ", "max_diff": 2.5}
    checks = {0: {"trainers": [{"slot": "0/0", "findings": [{"step": 3, "ok": True}, failed]},
                               {"slot": "0/1", "findings": [{"step": 3, "ok": True}]}]},
              1: {"trainers": [{"slot": "1/0", "findings": [{"step": 1, "ok": True}]}]}}
    out = {v["slot"]: v for v in proofs.apply(doc, checks)["verdicts"]}
    assert out["0/0"]["proven"] and out["0/0"]["malicious"] and "step 7" in out["0/0"]["reason"]
    assert "outputs" in out["0/0"]["reason"] and "2.5" in out["0/0"]["reason"]
    assert not out["0/1"]["malicious"] and not out["0/1"]["flagged"] and "not held against it" in out["0/1"]["reason"]
    assert out["1/1"]["flagged"] and "proven" not in out["1/1"]  # another pipeline's statistics stand
    assert doc["flagged"] == [True, False]
    assert proofs.failures(None) == {} and proofs.failures(checks[1]) == {}


def test_each_side_by_side_check_replays_on_one_thread_and_gives_its_own_count_back():
    """Referees check pipelines side by side in threads; torch's thread count belongs to each thread, so each
    check sets its own: a check that ends first must not hand the other one back its threads."""
    import threading

    from tdml_core.verify.recompute import one_thread

    before = torch.get_num_threads()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        torch.set_num_threads(2)  # a worker thread that scored a model on two threads before
        with one_thread():
            a_in.set()
            b_in.wait(10)
            seen["a inside"] = torch.get_num_threads()
        seen["a after"] = torch.get_num_threads()
        a_out.set()

    def second():
        torch.set_num_threads(2)
        a_in.wait(10)
        with one_thread():
            b_in.set()
            a_out.wait(10)  # the other check has ended and given its own count back
            x = torch.randn(64, 64)
            float((x @ x).sum())
            seen["b inside, after a ended"] = torch.get_num_threads()
        seen["b after"] = torch.get_num_threads()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"a inside": 1, "a after": 2, "b inside, after a ended": 1, "b after": 2}
    assert torch.get_num_threads() == before  # the caller's own count never moved
