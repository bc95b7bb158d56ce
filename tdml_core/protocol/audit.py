"""Re-check a finished job from its ledger and its store alone.

The auditor holds the client's key (to open the job's keys) and nothing the
run computed: it re-executes the chain (embedded runs), reads every commitment
of the job's ledger, checks that each was signed by its slot's rightful writer,
fetches every committed id and checks its bytes and digest, loads every local
model, re-scores them on the committed validation set (and the global models on
the client's test set, derived from the committed spec), re-draws every trainer's
challenged steps from the block hash after its commitments and re-runs them on
what it revealed (an accusation the evidence does not support fails), re-applies detection and the
top-K rule to rebuild each global model, recounts the work the contract paid
for, and re-derives the figures of ``summary.json``. The first mismatch stops
the audit with a message naming it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from tdml_core.artifacts import ArtifactError, open_sealed, state_from_bytes
from tdml_core.chain.client import ChainError
from tdml_core.chain.market import SERVER, TRAINER, Kind, Slot
from tdml_core.crypto import CryptoError, digest
from tdml_core.identity import Identity
from tdml_core.protocol.job import Job, JobRef, Participants, ProtocolError, forget_chain, spec_from_doc
from tdml_core.protocol.keys import role_of
from tdml_core.protocol.rewards import payout, planned_units, refund, validator_of
from tdml_core.runtime.context import make_plan
from tdml_core.storage import StoreError

LOG_CHUNK = 5000  # blocks per event query
SEALED_TO_ONE = {Kind.CLIENT_KEYS, Kind.SERVER_KEYS, Kind.DATA_KEY, Kind.TRAINER_KEYS}  # envelope digest committed
DOCS = {Kind.SPEC, Kind.PLAN, Kind.SCORE, Kind.CHECKS, Kind.VERDICTS}
AGGREGATOR_KINDS = {Kind.ATTEMPT, Kind.STAGE, Kind.VERDICTS, Kind.GLOBAL}


class AuditFailure(RuntimeError):
    """What the ledger, the store and a re-computation disagree on."""


def _opening_error(exc: Exception) -> AuditFailure:
    return AuditFailure(f"cannot open the job's contracts ({type(exc).__name__}: {str(exc).splitlines()[0]})")


class Auditor:
    def __init__(self, out_dir: str | Path, key_file: str | Path | None = None, passphrase: str | None = None,
                 say: Callable[[str], None] = print):
        self.out = Path(out_dir)
        self.say = say
        self.ref = JobRef.load(self.out)
        if self.ref.ledger is None or self.ref.market is None or self.ref.job_id is None:
            raise ProtocolError(f"{out_dir}: the job never opened its ledger; there is nothing to audit")
        client = Identity.load(key_file or self.out / "keys" / "client.json", passphrase)
        if self.ref.chain == "embedded" and not (self.out / "chain.jsonl").is_file():
            raise AuditFailure(f"{self.out / 'chain.jsonl'} is missing: the run's embedded chain cannot be re-executed")
        forget_chain(self.ref)  # re-execute the journal afresh, whatever this process opened before
        try:
            self.job = Job(self.ref, None, Participants(client, [], {}))
            if not self.job.chain.w3.eth.get_code(self.job.market.address):
                raise AuditFailure(f"no market contract at {self.job.market.address} on this chain "
                                   f"(is chain.jsonl from another run?)")
            self.task = self.job.market.task(self.ref.job_id)
        except AuditFailure:
            raise
        except ChainError as exc:
            raise AuditFailure(f"the run's chain: {exc}") from None
        except Exception as exc:  # a damaged address, a journal of another run: say which, in one line
            raise _opening_error(exc) from None
        self.opened: dict[Slot, object] = {}
        self._test_set: bool | None = None  # whether the client's test set is here (has_test_set)
        self._hired: dict[str, tuple[int, int, int]] = {}  # writer -> its hiring (_hired_for)
        self._servers: dict[int, str] = {}  # pipeline -> its server (_server_at)

    def has_test_set(self) -> bool:
        """Whether the client's test set (derived from the committed spec's dataset) is on this machine."""
        if self._test_set is None:
            from tdml_core.data import DatasetError

            try:
                self.job.test_set()
                self._test_set = True
            except DatasetError as exc:
                self._test_set = False
                self.say(f"note: the client's test set is not here ({exc}): the reported test accuracies are not "
                         "re-derived; the validation scores are")
        return self._test_set

    def ok(self, message: str) -> None:
        self.say(f"ok    {message}")

    def fail(self, message: str) -> None:
        raise AuditFailure(message)

    # -- the checks, in order ------------------------------------------------------------
    def run(self) -> None:
        self.check_chain()
        self.check_signers()
        self.check_store()
        self.check_plan()
        self.check_epochs()
        self.check_rewards()
        self.check_summary()

    def check_chain(self) -> None:
        job, task = self.job, self.task
        how = f"{job.chain.tx_count} transactions re-executed from chain.jsonl" if job.ref.chain == "embedded" \
            else f"JSON-RPC node at {job.ref.chain}"
        if job.chain.chain_id != self.ref.chain_id:
            self.fail(f"chain id {job.chain.chain_id} is not the run's {self.ref.chain_id}")
        if task["ledger"] != job.ledger.address:
            self.fail(f"market {job.market.address} names ledger {task['ledger']} for job {job.job_id}, "
                      f"job.json names {job.ledger.address}")
        if task["client"] != job.people.client.address:
            self.fail(f"job {job.job_id} was published by {task['client']}, not by the client key "
                      f"{job.people.client.address}")
        if self.ref.ledger_block != task["ledger_block"]:
            self.fail(f"job.json says the ledger opened at block {self.ref.ledger_block}; "
                      f"the market says {task['ledger_block']}")
        self.ok(f"chain {job.chain.chain_id}: {how}; job {job.job_id}, ledger {job.ledger.address}")

    def commitments(self) -> list[dict]:
        chain, c = self.job.chain, self.job.ledger.c
        start, last = self.task["ledger_block"], chain.w3.eth.block_number
        out = []
        for lo in range(start, last + 1, LOG_CHUNK):
            out += chain.logs(c, "Committed", lo, min(lo + LOG_CHUNK - 1, last))
        for ev in out:
            ev["slot"] = Slot(ev["epoch"], Kind(ev["kind"]), ev["pipeline"], ev["stage"], ev["attempt"])
        return out

    def rightful_writer(self, slot: Slot, writer: str) -> str | None:
        """Who may write ``slot``; None when ``writer`` is the trainer the market hired for it."""
        m, task_id, n = self.job.market, self.job.job_id, self.task["splits"]
        kind = slot.kind
        if kind in (Kind.WEIGHTS, Kind.GRAD, Kind.ROOT):  # a replacement holds the slot after an eviction
            if self._hired_for(writer) == (TRAINER, slot.pipeline, slot.stage):
                return None
            return m.holder(task_id, slot.pipeline, slot.stage)
        if kind in (Kind.PLAN, Kind.TRAINER_KEYS):
            return self._server_at(slot.pipeline)
        if kind in (Kind.SCORE, Kind.CHECKS):  # the validator of a pipeline is also its trainers' referee
            return self._server_at(validator_of(slot.pipeline, n))
        if kind in AGGREGATOR_KINDS:
            return self._server_at(0)
        return self.task["client"]

    def _server_at(self, pipeline: int) -> str:
        if pipeline not in self._servers:
            self._servers[pipeline] = self.job.market.server_at(self.job.job_id, pipeline)
        return self._servers[pipeline]

    def _hired_for(self, who: str) -> tuple[int, int, int]:
        """(role, pipeline, stage) the market records for ``who``: from its Hired event, or read from the
        market's state for a writer the events do not name."""
        if who not in self._hired:
            m, task_id = self.job.market, self.job.job_id
            self._hired[who] = (m.role(task_id, who), m.pipeline_of(task_id, who), m.stage_of(task_id, who))
        return self._hired[who]

    def hirings(self) -> dict[str, tuple[int, int, int]]:
        """(role, pipeline, stage) of everyone the market hired for this job, from its Hired events.

        A participant is hired once (the market refuses a second hiring) and its role,
        pipeline and stage never change after, so the events give what the market's
        state gives, in one query instead of three calls per participant.
        """
        job = self.job
        last = job.chain.w3.eth.block_number
        return {ev["who"]: (ev["role"], ev["pipeline"], ev["stage"])
                for ev in job.chain.logs(job.market.c, "Hired", 0, last, where={"task_id": job.job_id})}

    def check_signers(self) -> None:
        """Every commitment was signed by its slot's owner, as the market's hiring records name it."""
        self.events = self.commitments()
        self._hired.update(self.hirings())
        self._servers.update({p: who for who, (role, p, _) in self._hired.items() if role == SERVER})
        for ev in self.events:
            owner = self.rightful_writer(ev["slot"], ev["writer"])
            if owner is not None and owner != ev["writer"]:
                self.fail(f"{ev['slot']}: signed by {ev['writer']}, but the slot belongs to {owner}")
        self.ok(f"signers: each of {len(self.events)} commitments signed by its slot's owner")

    def check_store(self) -> None:
        """Every committed id is in the store, its bytes match the id, and it opens to the committed digest."""
        job = self.job
        n_bytes = 0
        # the client's keys first, then the spec: the other checks need them
        first = {Kind.CLIENT_KEYS: 0, Kind.SPEC: 1}
        self.events.sort(key=lambda ev: (first.get(ev["slot"].kind, 2), ev["epoch"]))
        for ev in self.events:
            slot = ev["slot"]
            if ev["cid"] == "":
                continue
            try:
                raw = bytes(job.store.get(ev["cid"]))
            except StoreError as exc:
                self.fail(f"{slot} ({ev['cid']}): {exc}")
            n_bytes += len(raw)
            if slot.kind in SEALED_TO_ONE:  # sealed to one participant: the envelope's digest is committed
                if digest(raw) != ev["digest"].hex().removeprefix("0x"):
                    self.fail(f"{slot} ({ev['cid']}): envelope does not match its committed digest")
                continue
            try:  # opened from the bytes just checked: each artifact is fetched once
                key = job.keys.for_kind(slot.kind, slot.pipeline, slot.stage)
                content = open_sealed(key, raw, job.job_id, role_of(slot.kind, slot.pipeline, slot.stage),
                                      ev["cid"], ev["digest"].hex())
                obj = json.loads(content) if slot.kind in DOCS else state_from_bytes(content)
            except (StoreError, CryptoError, ArtifactError, ValueError, ProtocolError) as exc:
                self.fail(f"{slot} ({ev['cid']}): {exc}")
            self.opened[slot] = obj
            if slot.kind == Kind.SPEC:
                job.spec = spec_from_doc(obj)
        self.ok(f"store {self.ref.store_url}: {len(self.events)} commitments, every id present, "
                f"{n_bytes:,} bytes match their ids and digests")

    def _got(self, slot: Slot):
        try:
            return self.opened[slot]
        except KeyError:
            self.fail(f"nothing committed for {slot}")

    def check_plan(self) -> None:
        job = self.job
        spec = job.spec
        if spec is None:
            self.fail("the job's spec was never committed")
        x, _, _ = job.eval_set()
        model = job.new_model()
        job.plan = make_plan(spec, model, x)
        job.n_stages = job.plan.n_stages
        self.servers = [job.server_address(p) for p in range(spec.data_parallel)]
        self.trainers = {}
        for p in range(spec.data_parallel):
            doc = self._got(Slot(0, Kind.PLAN, p))
            if doc["plan"] != job.plan.to_dict():
                self.fail(f"plan of pipeline {p} is not the plan the committed spec gives")
            for s, address in enumerate(doc["trainers"]):
                self.trainers[(p, s)] = address
        replaced = self.replacements()
        self.holders = {}
        for (p, s), first in self.trainers.items():
            chain = [first]
            for old, new in replaced.get((p, s), []):
                if old != chain[-1]:
                    self.fail(f"slot {p}/{s}: {old} was replaced, but {chain[-1]} held it")
                if not job.ledger.evicted(old):
                    self.fail(f"slot {p}/{s}: {old} was replaced without being evicted")
                chain.append(new)
            if chain[-1] != job.trainer_address(p, s):
                self.fail(f"plan of pipeline {p} names {first} for stage {s}; the market hired "
                          f"{job.trainer_address(p, s)}")
            self.holders[(p, s)] = chain
        init = self._got(Slot(0, Kind.INIT))
        if set(init) != set(model.state_dict()):
            self.fail("the initial model does not fit the spec's model")
        n_replaced = sum(len(c) - 1 for c in self.holders.values())
        self.ok(f"plan: {spec.data_parallel} pipelines x {job.n_stages} stages as the spec gives; "
                f"{len(self.trainers)} trainers named, each the one the market hired"
                + (f"; {n_replaced} evicted and replaced by their servers" if n_replaced else ""))

    def replacements(self) -> dict[tuple[int, int], list[tuple[str, str]]]:
        """The market's Replaced events of this task, per slot, in order."""
        job, out = self.job, {}
        last = job.chain.w3.eth.block_number
        for lo in range(self.task["ledger_block"], last + 1, LOG_CHUNK):
            for ev in job.chain.logs(job.market.c, "Replaced", lo, min(lo + LOG_CHUNK - 1, last)):
                if ev["task_id"] == job.job_id:
                    out.setdefault((ev["pipeline"], ev["stage"]), []).append((ev["old"], ev["new"]))
        return out

    def check_epochs(self) -> None:
        from tdml_core.protocol.steps import global_model, global_scores, judge, score, stage_keys

        job, spec = self.job, self.job.spec
        epochs = job.ledger.global_epochs
        if epochs != spec.rounds:
            self.fail(f"the ledger has {epochs} global models; the spec asks for {spec.rounds} "
                      + (f"rounds ({spec.epochs} epochs x {spec.rounds_per_epoch})" if spec.rounds_per_epoch > 1
                         else "epochs"))
        keys = stage_keys(job)
        self.convicted: dict[str, tuple[int, str]] = {}
        self.checked = 0
        previous = self._got(Slot(0, Kind.INIT))
        self.derived: list[dict] = []
        for e in range(epochs):
            a = job.attempt(e)
            for s, ks in enumerate(keys):  # the trainers started from the previous global model
                got = self._got(Slot(e, Kind.STAGE, 0, s))
                if set(got) != set(ks) or any(not torch.equal(got[k], previous[k]) for k in ks):
                    self.fail(f"epoch {e} stage {s}: the weights handed to trainers are not the previous global model's")
            scores: list[dict | None] = []
            for p in range(spec.data_parallel):
                if job.commitment(e, Kind.WEIGHTS, p, 0, a) is None and job.commitment(e, Kind.SCORE, p, 0, a) is None:
                    if not any(job.ledger.evicted(t) for s in range(job.n_stages) for t in self.holders[(p, s)]):
                        self.fail(f"epoch {e} pipeline {p}: no local model, and none of its trainers was evicted")
                    scores.append(None)  # dropped: evicted with no standby to replace it
                    continue
                state = {}
                for s in range(job.n_stages):
                    state.update(self._got(Slot(e, Kind.WEIGHTS, p, s, a)))
                    self._got(Slot(e, Kind.GRAD, p, s, a))
                try:
                    acc, loss = score(job, state)
                except RuntimeError as exc:
                    self.fail(f"epoch {e} pipeline {p}: the local model does not load ({exc})")
                doc = self._got(Slot(e, Kind.SCORE, p, 0, a))
                if doc["validator"] != self.servers[validator_of(p, spec.data_parallel)]:
                    self.fail(f"epoch {e} pipeline {p}: scored by {doc['validator']}, not its validator")
                if abs(doc["accuracy"] - acc) > 1e-6 or not math.isclose(doc["loss"], loss, rel_tol=1e-4, abs_tol=1e-6):
                    self.fail(f"epoch {e} pipeline {p}: committed score accuracy {doc['accuracy']:.6f} "
                              f"loss {doc['loss']:.6f}, re-evaluated accuracy {acc:.6f} loss {loss:.6f}")
                scores.append(doc)
                self.check_work(e, a, p)
            committed = self._got(Slot(e, Kind.VERDICTS, attempt=a))
            expect = judge(job, e, a, scores)
            if committed.get("flagged") != expect["flagged"]:
                self.fail(f"epoch {e}: committed flags {committed.get('flagged')}, the detection rules give "
                          f"{expect['flagged']}")
            have = {v["slot"]: v for v in committed.get("verdicts", [])}
            for v in expect["verdicts"]:
                c = have.get(v["slot"])
                fields = ("trainer", "flagged", "malicious", "proven")
                def seen(d):
                    return {k: (bool(d.get(k)) if k == "proven" else d.get(k)) for k in fields}

                if c is None or seen(c) != seen(v):
                    got_v = None if c is None else seen(c)
                    self.fail(f"epoch {e}: the verdict on trainer {v['slot']} is {got_v}; re-derived from the "
                              f"committed updates and checks it is {seen(v)}")
            if len(have) != len(expect["verdicts"]):
                self.fail(f"epoch {e}: {len(have)} verdicts committed, {len(expect['verdicts'])} re-derived")
            for v in expect["verdicts"]:
                if v["malicious"] and not job.ledger.evicted(v["trainer"]):
                    self.fail(f"epoch {e}: trainer {v['slot']} was judged malicious but not evicted on the ledger")
                if v.get("proven") and not job.ledger.forfeited(v["trainer"]):
                    self.fail(f"epoch {e}: trainer {v['slot']} failed a check but was not convicted on the ledger")
                if v.get("proven"):
                    self.convicted[v["trainer"]] = (e, v["slot"])
            start = {}
            for s in range(job.n_stages):
                start.update(self._got(Slot(e, Kind.STAGE, 0, s)))
            want, chosen, rule = global_model(job, e, a, scores, expect, start)
            got = self._got(Slot(e, Kind.GLOBAL, attempt=a))
            if set(got) != set(want) or any(not torch.allclose(got[k].double(), want[k].double(), atol=1e-6, rtol=0)
                                            for k in want):
                self.fail(f"epoch {e}: the committed global model is not {rule} of local models {chosen}")
            (g_val, g_val_loss), test = global_scores(job, got, with_test=self.has_test_set())
            g_acc, g_loss = test or (None, None)
            self.derived.append({"epoch": e, "attempt": a, "scores": [sc for sc in scores if sc is not None],
                                 "flagged": expect["flagged"], "chosen": chosen,
                                 "verdicts": [{k: x for k, x in v.items() if k != "evidence"}
                                              for v in committed["verdicts"]],
                                 "global_accuracy": g_acc, "global_loss": g_loss,
                                 "global_val_accuracy": g_val, "global_val_loss": g_val_loss,
                                 "global_model_cid": job.must(e, Kind.GLOBAL, attempt=a).cid})
            previous = got
            accs = ", ".join("dropped" if d is None else f"{d['accuracy']:.4f}" for d in scores)
            n_flag = sum(v["flagged"] for v in expect["verdicts"])
            n_proven = sum(bool(v.get("proven")) for v in expect["verdicts"])
            self.ok(f"epoch {e}: {sum(sc is not None for sc in scores)} local models load, scores reproduce ({accs}), "
                    + (f"{self.checked} challenged steps re-run ({n_proven} fraud proofs), " if spec.verification.enabled
                       else "")
                    + f"{len(expect['verdicts'])} verdicts re-derived ({n_flag} flagged), global = {rule} of {chosen}")
            self.checked = 0

    def check_work(self, e: int, a: int, p: int) -> None:
        """Re-draw pipeline ``p``'s challenges of epoch ``e`` and re-run them on what its trainers revealed."""
        from tdml_core.protocol.steps import block_seed, check_trainers

        job, spec = self.job, self.job.spec
        slot = Slot(e, Kind.CHECKS, p, 0, a)
        if not spec.verification.enabled:
            return
        doc = self._got(slot)
        if "skipped" in doc:
            if spec.protocol.pipeline_pool is None:
                self.fail(f"epoch {e} pipeline {p}: its referee skipped the checks ({doc['skipped']}), "
                          f"but the run used no work pool")
            return
        block = job.ledger.last_work_block(e, a) + 1
        seed = block_seed(job.chain, block).hex()
        if doc.get("seed_block") != block or doc.get("seed") != seed:
            self.fail(f"epoch {e} pipeline {p}: the checks were drawn from block {doc.get('seed_block')} "
                      f"({doc.get('seed')}); the first block after the last commitment is {block} ({seed})")
        reveals = {tuple(int(x) for x in t["slot"].split("/")): t["reveal"] or {"error": "no answer"}
                   for t in doc["trainers"]}
        redo = {t["slot"]: t for t in check_trainers(job, p, e, a, bytes.fromhex(seed), reveals)}
        have = {t["slot"]: t for t in doc["trainers"]}
        if set(have) != set(redo):
            self.fail(f"epoch {e} pipeline {p}: the checks cover trainers {sorted(have)}, not {sorted(redo)}")
        for name, want in redo.items():
            got = have[name]
            if got["steps"] != want["steps"]:
                self.fail(f"epoch {e}: trainer {name}'s checked steps {got['steps']} are not the ones the seed "
                          f"draws {want['steps']}")
            outcome = [(f["step"], f["ok"], f["what"]) for f in want["findings"]]
            claimed = [(f["step"], f["ok"], f["what"]) for f in got["findings"]]
            if claimed != outcome or got["failed"] != want["failed"]:
                bad = next((f for f in want["findings"] if not f["ok"]), None)
                said = next((f for f in got["findings"] if not f["ok"]), None)
                if got["failed"] and not want["failed"]:
                    self.fail(f"epoch {e}: the checks accuse trainer {name} (step {said['step']}: {said['what']}), "
                              f"but re-running its revealed steps they all pass: the evidence does not support it")
                if want["failed"] and not got["failed"]:
                    self.fail(f"epoch {e}: the checks clear trainer {name}, but re-running its revealed steps, "
                              f"step {bad['step']} fails ({bad['what']}: {bad['detail']})")
                self.fail(f"epoch {e}: trainer {name}'s committed findings {claimed} are not what re-running "
                          f"its revealed steps gives {outcome}")
            self.checked += len(want["steps"])

    def check_rewards(self) -> None:
        from tdml_core.protocol.steps import work_done

        job, spec, task = self.job, self.job.spec, self.task
        if not job.ledger.finished or not job.market.task(job.job_id)["settled"]:
            self.fail("the job was not finished and settled")
        done = work_done(job, self.servers, self.holders)
        planned = planned_units(spec.rounds, spec.data_parallel, job.n_stages)
        budget, client, bond = task["budget"], task["client"], task["bond"]
        for address in list(done):
            if job.ledger.forfeited(address) and address not in self.convicted:
                self.fail(f"{address} was convicted on the ledger, but no committed check of its work failed")
        paid: dict[str, int] = {}
        last = job.chain.w3.eth.block_number
        for lo in range(task["ledger_block"], last + 1, LOG_CHUNK):
            for ev in job.chain.logs(job.market.c, "Paid", lo, min(lo + LOG_CHUNK - 1, last)):
                if ev["task_id"] == job.job_id:
                    paid[ev["who"]] = paid.get(ev["who"], 0) + ev["amount"]
        self.rewards = {}
        for address, epochs in done.items():
            if job.ledger.work(address) != len(epochs):
                self.fail(f"{address} was credited {job.ledger.work(address)} units; its verified work is "
                          f"{len(epochs)} (epochs {epochs})")
            if any(not job.ledger.credited_for(address, e) for e in epochs):
                self.fail(f"{address} was not credited for the epochs of its verified work {epochs}")
            self.rewards[address] = payout(budget, len(epochs), planned)
            kept = 0 if address in self.convicted else bond  # a convicted trainer's bond goes to the client
            if paid.get(address, 0) != self.rewards[address] + kept:
                self.fail(f"{address} was paid {paid.get(address, 0)} wei; the rule gives "
                          f"{self.rewards[address]} and {'no bond (convicted)' if address in self.convicted else f'its bond {bond}'}")
        credited = sum(len(e) for e in done.values())
        self.refund = refund(budget, credited, planned)
        forfeits = bond * len(self.convicted)
        if paid.get(client, 0) != self.refund + forfeits:
            self.fail(f"the client was paid {paid.get(client, 0)} wei; the rule gives its refund {self.refund}"
                      + (f" and {len(self.convicted)} forfeited bonds of {bond}" if self.convicted else ""))
        self.ok(f"rewards: {len(done)} participants paid budget x units / {planned} as the contract's rule gives; "
                f"bonds returned" + (f", {len(self.convicted)} forfeited to the client" if self.convicted else "")
                + f"; refund {self.refund} wei")

    def check_summary(self) -> None:
        """summary.json's figures, each re-derived from the ledger and the store."""
        path = self.out / "summary.json"
        if not path.is_file():
            self.fail(f"{path} is missing")
        try:
            data = json.loads(path.read_text())
        except ValueError:
            self.fail(f"{path} is not JSON")

        def same(what: str, have, want, close: bool = False) -> None:
            equal = math.isclose(have, want, abs_tol=1e-6) if close and isinstance(have, (int, float)) \
                and isinstance(want, (int, float)) else have == want
            if not equal:
                self.fail(f"summary.json {what} is {have!r}; the ledger and store give {want!r}")

        same("job_id", data.get("job_id"), self.job.job_id)
        same("status", data.get("status"), "finished")
        same("chain.ledger", (data.get("chain") or {}).get("ledger"), self.job.ledger.address)
        epochs = data.get("epochs") or []
        same("epoch count", len(epochs), len(self.derived))
        for rec, d in zip(epochs, self.derived):
            e = d["epoch"]
            if d["global_accuracy"] is not None:  # the client's test set is here
                same(f"epoch {e} global_accuracy", rec.get("global_accuracy"), d["global_accuracy"], close=True)
                same(f"epoch {e} global_loss", rec.get("global_loss"), d["global_loss"], close=True)
            same(f"epoch {e} global_val_accuracy", rec.get("global_val_accuracy"), d["global_val_accuracy"], close=True)
            same(f"epoch {e} global_val_loss", rec.get("global_val_loss"), d["global_val_loss"], close=True)
            same(f"epoch {e} global_model_cid", rec.get("global_model_cid"), d["global_model_cid"])
            same(f"epoch {e} attempt", rec.get("attempt"), d["attempt"])
            same(f"epoch {e} verdicts", rec.get("verdicts"), d["verdicts"])
            local = rec.get("local") or []
            same(f"epoch {e} local model count", len(local), len(d["scores"]))
            for lc, sc in zip(local, d["scores"]):
                p = sc["pipeline"]
                same(f"epoch {e} pipeline {p} accuracy", lc.get("accuracy"), sc["accuracy"], close=True)
                same(f"epoch {e} pipeline {p} flagged", lc.get("flagged"), d["flagged"][p])
                same(f"epoch {e} pipeline {p} selected", lc.get("selected"), p in d["chosen"])
        if self.derived and self.derived[-1]["global_accuracy"] is not None:
            same("final_accuracy", data.get("final_accuracy"), self.derived[-1]["global_accuracy"], close=True)
        same("rewards", data.get("rewards"), self.rewards)
        same("refund_wei", data.get("refund_wei"), self.refund)
        evicted = [f"{p}/{s}" for (p, s), hs in sorted(self.holders.items()) for t in hs if self.job.ledger.evicted(t)]
        same("evicted", data.get("evicted"), evicted)
        self.ok(f"summary.json: accuracies, verdicts, rewards and refund of {len(epochs)} epochs re-derived")


def audit(out_dir: str | Path, key_file: str | Path | None = None, passphrase: str | None = None,
          say: Callable[[str], None] = print) -> None:
    """Raise ``AuditFailure`` on the first mismatch; say what was checked."""
    Auditor(out_dir, key_file, passphrase, say).run()


__all__ = ["AuditFailure", "Auditor", "audit"]
