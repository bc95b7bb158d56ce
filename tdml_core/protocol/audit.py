"""Re-check a finished job from its ledger and its store alone.

The auditor holds the client's key (to open the job's secrets) and nothing the
run computed: it re-executes the chain (embedded runs), reads every commitment
of the job's ledger, fetches every committed id and checks its bytes and
digest, loads every local model, re-scores them on the committed test set,
re-applies detection and the top-K rule to rebuild each global model, and
recounts the work the contract paid for. The first mismatch stops the audit
with a message naming it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from tdml_core.artifacts import ArtifactError, open_sealed, state_from_bytes
from tdml_core.crypto import CryptoError, digest
from tdml_core.identity import Identity
from tdml_core.protocol.job import Job, JobRef, Participants, ProtocolError, epoch_slot, forget_chain, spec_from_doc
from tdml_core.protocol.rewards import payout, planned_units, validator_of
from tdml_core.robust.aggregate import average_states
from tdml_core.robust.detect import score_outliers
from tdml_core.runtime.context import make_plan
from tdml_core.storage import StoreError

LOG_CHUNK = 5000  # blocks per event query


class AuditFailure(RuntimeError):
    """What the ledger, the store and a re-computation disagree on."""


def _base_slot(slot: str) -> str:
    return slot.split("~")[0]


# kind -> (role of the sealed artifact, which key, state or doc); None: nothing to open
_ROLES: dict[str, tuple[Callable[[str], str], str, str] | None] = {
    "spec": (lambda s: "spec", "data_key", "doc"),
    "plan": (lambda s: f"plan/{s}", "model_key", "doc"),
    "data": (lambda s: f"data/{s}", "data_key", "state"),
    "test": (lambda s: "test", "data_key", "state"),
    "init": (lambda s: "init", "model_key", "state"),
    "stage": (lambda s: f"stage/{s}", "model_key", "state"),
    "weights": (lambda s: f"weights/{s}", "model_key", "state"),
    "grad": (lambda s: f"grad/{s}", "model_key", "state"),
    "score": (lambda s: f"score/{s}", "model_key", "doc"),
    "verdicts": (lambda s: "verdicts", "model_key", "doc"),
    "global": (lambda s: "global", "model_key", "state"),
    "secrets": None,
    "pubkey": None,
    "attempt": None,
}


class Auditor:
    def __init__(self, out_dir: str | Path, key_file: str | Path | None = None, passphrase: str | None = None,
                 say: Callable[[str], None] = print):
        self.out = Path(out_dir)
        self.say = say
        self.ref = JobRef.load(self.out)
        if self.ref.ledger is None:
            raise ProtocolError(f"{out_dir}: the job never opened its ledger; there is nothing to audit")
        client = Identity.load(key_file or self.out / "keys" / "client.json", passphrase)
        forget_chain(self.ref)  # re-execute the journal afresh, whatever this process opened before
        self.job = Job(self.ref, None, Participants(client, [], {}))
        self.opened: dict[tuple[int, str, str], object] = {}

    def ok(self, message: str) -> None:
        self.say(f"ok    {message}")

    def fail(self, message: str) -> None:
        raise AuditFailure(message)

    # -- the checks, in order ------------------------------------------------------------
    def run(self) -> None:
        self.check_chain()
        self.check_store()
        self.check_plan()
        self.check_epochs()
        self.check_rewards()

    def check_chain(self) -> None:
        job = self.job
        how = f"{job.chain.tx_count} transactions re-executed from chain.jsonl" if job.ref.chain == "embedded" \
            else f"JSON-RPC node at {job.ref.chain}"
        if job.chain.chain_id != self.ref.chain_id:
            self.fail(f"chain id {job.chain.chain_id} is not the run's {self.ref.chain_id}")
        if job.market.task(job.job_id)["ledger"] != job.ledger.address:
            self.fail(f"market {job.market.address} names another ledger for job {job.job_id}")
        self.ok(f"chain {job.chain.chain_id}: {how}; job {job.job_id}, ledger {job.ledger.address}")

    def commitments(self) -> list[dict]:
        chain, c = self.job.chain, self.job.ledger.c
        start, last = self.ref.ledger_block or 0, chain.w3.eth.block_number
        out = []
        for lo in range(start, last + 1, LOG_CHUNK):
            out += chain.logs(c, "Committed", lo, min(lo + LOG_CHUNK - 1, last))
        return out

    def check_store(self) -> None:
        """Every committed id is in the store, its bytes match the id, and it opens to the committed digest."""
        job = self.job
        self.events = self.commitments()
        n_bytes = 0
        # the spec first: the other checks need it
        self.events.sort(key=lambda ev: (ev["kind"] != "spec", ev["epoch"]))
        for ev in self.events:
            kind, slot, epoch = ev["kind"], ev["slot"], ev["epoch"]
            name = f"epoch {epoch} {kind} {slot}"
            if kind not in _ROLES:
                self.fail(f"{name}: unknown kind of commitment")
            if ev["cid"] == "":
                continue
            try:
                raw = bytes(job.store.get(ev["cid"]))
            except StoreError as exc:
                self.fail(f"{name} ({ev['cid']}): {exc}")
            n_bytes += len(raw)
            if _ROLES[kind] is None:  # sealed to one participant: the envelope's digest is committed
                if digest(raw) != ev["digest"].hex().removeprefix("0x"):
                    self.fail(f"{name} ({ev['cid']}): envelope does not match its committed digest")
                continue
            role, key, form = _ROLES[kind]
            try:  # opened from the bytes just checked: each artifact is fetched once
                content = open_sealed(job.secrets[key], raw, job.job_id, role(_base_slot(slot)), ev["cid"],
                                      ev["digest"].hex())
                obj = json.loads(content) if form == "doc" else state_from_bytes(content)
            except (StoreError, CryptoError, ArtifactError, ValueError) as exc:
                self.fail(f"{name} ({ev['cid']}): {exc}")
            self.opened[(epoch, kind, slot)] = obj
            if kind == "spec":
                job.spec = spec_from_doc(obj)
        self.ok(f"store {self.ref.store_url}: {len(self.events)} commitments, every id present, "
                f"{n_bytes:,} bytes match their ids and digests")

    def check_plan(self) -> None:
        job = self.job
        spec = job.spec
        x, _, _ = job.test_set()
        model = job.new_model()
        job.plan = make_plan(spec, model, x)
        job.n_stages = job.plan.n_stages
        self.servers = [job.must(0, "pubkey", f"server/{p}").writer for p in range(spec.data_parallel)]
        self.trainers = {}
        for p in range(spec.data_parallel):
            doc = self.opened[(0, "plan", str(p))]
            if doc["plan"] != job.plan.to_dict():
                self.fail(f"plan of pipeline {p} is not the plan the committed spec gives")
            for s, address in enumerate(doc["trainers"]):
                self.trainers[(p, s)] = address
        init = self.opened[(0, "init", "model")]
        if set(init) != set(model.state_dict()):
            self.fail("the initial model does not fit the spec's model")
        self.ok(f"plan: {spec.data_parallel} pipelines x {job.n_stages} stages as the spec gives; "
                f"{len(self.trainers)} trainers named")

    def _state(self, epoch: int, kind: str, slot: str) -> dict:
        try:
            return self.opened[(epoch, kind, slot)]
        except KeyError:
            self.fail(f"epoch {epoch}: nothing committed for {kind} {slot}")

    def check_epochs(self) -> None:
        from tdml_core.protocol.steps import choose, score, stage_keys

        job, spec = self.job, self.job.spec
        epochs = job.ledger.global_epochs
        if epochs != spec.epochs:
            self.fail(f"the ledger has {epochs} global models; the spec asks for {spec.epochs} epochs")
        keys = stage_keys(job)
        previous = self._state(0, "init", "model")
        for e in range(epochs):
            a = job.attempt(e)
            for s, ks in enumerate(keys):  # the trainers started from the previous global model
                got = self._state(e, "stage", str(s))
                if set(got) != set(ks) or any(not torch.equal(got[k], previous[k]) for k in ks):
                    self.fail(f"epoch {e} stage {s}: the weights handed to trainers are not the previous global model's")
            scores, locals_ = [], []
            for p in range(spec.data_parallel):
                state = {}
                for s in range(job.n_stages):
                    state.update(self._state(e, "weights", epoch_slot(f"{p}/{s}", a)))
                    self._state(e, "grad", epoch_slot(f"{p}/{s}", a))
                try:
                    acc, loss = score(job, state)
                except RuntimeError as exc:
                    self.fail(f"epoch {e} pipeline {p}: the local model does not load ({exc})")
                doc = self._state(e, "score", epoch_slot(str(p), a))
                if doc["validator"] != self.servers[validator_of(p, spec.data_parallel)]:
                    self.fail(f"epoch {e} pipeline {p}: scored by {doc['validator']}, not its validator")
                if abs(doc["accuracy"] - acc) > 1e-6 or not math.isclose(doc["loss"], loss, rel_tol=1e-4, abs_tol=1e-6):
                    self.fail(f"epoch {e} pipeline {p}: committed score accuracy {doc['accuracy']:.6f} "
                              f"loss {doc['loss']:.6f}, re-evaluated accuracy {acc:.6f} loss {loss:.6f}")
                scores.append(doc)
                locals_.append(state)
            verdicts = self._state(e, "verdicts", epoch_slot("all", a))
            flagged = score_outliers([d["accuracy"] for d in scores], spec.protocol.score_tolerance)
            if verdicts["flagged"] != flagged:
                self.fail(f"epoch {e}: committed flags {verdicts['flagged']}, the score stage gives {flagged}")
            chosen = choose(scores, flagged, spec.top_k)
            expect = average_states([locals_[p] for p in chosen])
            got = self._state(e, "global", "model")
            if set(got) != set(expect) or any(not torch.allclose(got[k].double(), expect[k].double(), atol=1e-6, rtol=0)
                                              for k in expect):
                self.fail(f"epoch {e}: the committed global model is not the average of local models {chosen}")
            previous = got
            accs = ", ".join(f"{d['accuracy']:.4f}" for d in scores)
            self.ok(f"epoch {e}: {spec.data_parallel} local models load, scores reproduce ({accs}), "
                    f"global = average of {chosen}")

    def check_rewards(self) -> None:
        from tdml_core.protocol.steps import work_done

        job, spec = self.job, self.job.spec
        if not job.ledger.finished or not job.market.task(job.job_id)["settled"]:
            self.fail("the job was not finished and settled")
        units = work_done(job, self.servers, self.trainers)
        planned = planned_units(spec.epochs, spec.data_parallel, job.n_stages)
        task = job.market.task(job.job_id)
        budget, client = task["budget"], task["client"]
        paid = {}
        last = job.chain.w3.eth.block_number
        for lo in range(self.ref.ledger_block or 0, last + 1, LOG_CHUNK):
            for ev in job.chain.logs(job.market.c, "Paid", lo, min(lo + LOG_CHUNK - 1, last)):
                if ev["task_id"] == job.job_id:
                    paid[ev["who"]] = paid.get(ev["who"], 0) + ev["amount"]
        for address, u in units.items():
            if job.ledger.work(address) != u:
                self.fail(f"{address} was credited {job.ledger.work(address)} units; its verified work is {u}")
            if paid.get(address, 0) != payout(budget, u, planned):
                self.fail(f"{address} was paid {paid.get(address, 0)} wei; the rule gives {payout(budget, u, planned)}")
        refund = budget - sum(payout(budget, u, planned) for u in units.values())
        if paid.get(client, 0) != refund:
            self.fail(f"the client was refunded {paid.get(client, 0)} wei; the rule gives {refund}")
        self.ok(f"rewards: {len(units)} participants paid budget x units / {planned} as the contract's rule gives; "
                f"refund {refund} wei")


def audit(out_dir: str | Path, key_file: str | Path | None = None, passphrase: str | None = None,
          say: Callable[[str], None] = print) -> None:
    """Raise ``AuditFailure`` on the first mismatch; say what was checked."""
    Auditor(out_dir, key_file, passphrase, say).run()


__all__ = ["AuditFailure", "Auditor", "audit"]
