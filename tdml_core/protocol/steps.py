"""The protocol's steps, in the order of the protocol table.

Every step is safe to run again (a retried task, a resumed run): it first reads
what the ledger already holds and only does what is missing. Every write is
signed by the participant whose act it is.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from tdml_core.artifacts import doc_bytes
from tdml_core.config import JobSpec
from tdml_core.crypto import digest, new_data_key
from tdml_core.data import shard
from tdml_core.identity import Identity, seal_secrets
from tdml_core.model import split_model
from tdml_core.model.split import quiet_trace_warnings
from tdml_core.protocol.job import GAS_FUNDS_WEI, Job, JobRef, ProtocolError, epoch_slot, load_participants
from tdml_core.protocol.rewards import planned_units, trainer_earns, validator_of
from tdml_core.robust.aggregate import average_states, select_top_k
from tdml_core.robust.detect import gradient_stage, score_stage
from tdml_core.robust.validate import evaluate
from tdml_core.runtime.context import load_job, make_plan

SERVER_MEMORY = 16 * 2**30  # what a local parameter server offers on the market
TRAINER_MEMORY = 8 * 2**30  # a local trainer's offer when the spec names no memory


def _spec_doc(spec: JobSpec) -> dict:
    return spec.model_dump(mode="json")


# -- 0. open the run folder ---------------------------------------------------------
def check_run_folder(out_dir: str | Path, resume: bool) -> None:
    """A new job needs a folder without one; resuming needs the job that is there."""
    out = Path(out_dir)
    if resume:
        JobRef.load(out)  # says clearly when there is no job to resume
    elif (out / "job.json").exists():
        old = JobRef.load(out)
        raise ProtocolError(
            f"{out_dir} already holds job {old.job_id}; pass --resume to continue it, or choose another --out"
        )


def prepare(spec: JobSpec, out_dir: str | Path, resume: bool = False, chain: str | None = None,
            store: str | None = None) -> Job:
    """Open (or re-open, to resume) the job in ``out_dir``: keys, chain, store; fund gas."""
    out = Path(out_dir).resolve()
    check_run_folder(out_dir, resume)
    if resume:
        ref = JobRef.load(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        store_url = store or spec.protocol.store or "local:store"  # inside the run folder
        ref = JobRef(out_dir=str(out), chain=chain or spec.protocol.chain, store=store_url)
    ds, model = load_job(spec)
    job = Job(ref, spec, None)
    job.client_data, job.model = ds, model
    job.plan = make_plan(spec, job.model, ds)
    job.n_stages = job.plan.n_stages
    job.people = load_participants(spec, job.n_stages, out / "keys")
    job.ref.chain_id = job.chain.chain_id
    if resume and job.ledger is not None:
        have = job.commitment(0, "spec", "job")
        if have is not None and have.digest.removeprefix("0x") != digest(doc_bytes(_spec_doc(spec))):
            raise ProtocolError(f"this spec is not the one job {job.job_id} was published with")
    for who in job.people.everyone:
        _fund(job, who.address, GAS_FUNDS_WEI + (spec.protocol.budget_wei if who is job.people.client else 0))
    job.save_ref()
    return job


def _fund(job: Job, address: str, need: int) -> None:
    have = job.chain.balance(address)
    if have >= need:
        return
    try:
        job.chain.fund(address, need - have)
    except Exception as exc:
        raise ProtocolError(f"{address} needs {need - have} wei for the job and gas, and the faucet of "
                            f"{job.ref.chain} could not give it ({exc})") from None


# -- 1. publish task ------------------------------------------------------------------
def publish_task(job: Job) -> int:
    """The client publishes the task with the budget escrowed (deploying a market if none is given)."""
    from tdml_core.chain.market import MarketClient

    client, spec = job.people.client, job.spec
    if job.ref.market is None:
        job.market = MarketClient.deploy(job.chain, client.account)
        job.ref.market = job.market.address
        job.save_ref()
    if job.ref.job_id is None:
        job.ref.job_id, _ = job.market.publish_task(
            client.account, spec.name[:64], spec.protocol.budget_wei, 1, 1, spec.data_parallel
        )
        job.save_ref()
    return job.job_id


# -- 2. hire parameter servers -------------------------------------------------------------
def hire_parameter_servers(job: Job) -> list[str]:
    """Servers register (each signing), the client hires one per pipeline and opens the job ledger."""
    from tdml_core.chain.market import SERVER

    m, client = job.market, job.people.client
    for server in job.people.servers:
        if m.c.functions.servers(server.address).call()[0] == 0:
            m.register(server.account, SERVER_MEMORY, os.cpu_count() or 1)
    if not m.task(job.job_id)["hired"]:
        m.hire_servers(client.account, job.job_id, [s.address for s in job.people.servers])
    for server in job.people.servers:
        if m.role(job.job_id, server.address) != SERVER:
            raise ProtocolError(f"{server.address} is not a hired server of job {job.job_id}")
    if job.ref.ledger is None:
        units = planned_units(job.spec.epochs, job.spec.data_parallel, job.n_stages)
        job.ledger, sent = m.open_ledger(client.account, job.job_id, units)
        job.ref.ledger = job.ledger.address
        job.ref.ledger_block = sent.receipt["blockNumber"]
        job.save_ref()
    return [s.address for s in job.people.servers]


# -- 3. key exchange ------------------------------------------------------------------------
def _commit_public_key(job: Job, who: Identity, slot: str) -> None:
    job.commit_once(who, 0, "pubkey", slot, "", who.public_key.hex())


def _seal_to(job: Job, sender: Identity, receiver_slot: str, role: str, secrets: dict) -> None:
    if job.commitment(0, "secrets", receiver_slot) is not None:
        return
    envelope = seal_secrets(sender, job.public_key(receiver_slot), job.job_id, role, secrets)
    job.commit_once(sender, 0, "secrets", receiver_slot, job.store.put(envelope), digest(envelope))


def exchange_keys(job: Job) -> None:
    """Client and servers publish X25519 keys; the client seals the job's keys to every server."""
    client = job.people.client
    _commit_public_key(job, client, "client")
    for i, server in enumerate(job.people.servers):
        _commit_public_key(job, server, f"server/{i}")
    if job.commitment(0, "secrets", "server/0") is None:
        job.set_secrets({"data_key": new_data_key(), "model_key": new_data_key()})
    secrets = job.secrets  # the keys already sealed to server 0 when this step runs again
    for i in range(len(job.people.servers)):
        _seal_to(job, client, f"server/{i}", "job-secrets", secrets)
    cid, dig = job.put_doc("spec", _spec_doc(job.spec), key="data_key")
    job.commit_once(client, 0, "spec", "job", cid, dig)


# -- 4. shard model -------------------------------------------------------------------------
def stage_keys(job: Job) -> list[list[str]]:
    """Which entries of the model's state each stage holds (the same split every trainer makes)."""
    if job._stage_keys is None:
        quiet_trace_warnings()
        x, _, _ = job.test_set()
        stages = split_model(job.new_model(), job.plan, x[: job.spec.microbatch_size].clone())
        job._stage_keys = [sorted(m.state_dict().keys()) for m in stages]
    return job._stage_keys


def _put_stage_inputs(job: Job, epoch: int, state: dict) -> None:
    """The aggregating server puts each stage's slice of the global model in the store for ``epoch``."""
    server = job.people.servers[0]
    for s, keys in enumerate(stage_keys(job)):
        if job.commitment(epoch, "stage", str(s)) is None:
            cid, dig = job.put_state(f"stage/{s}", {k: state[k] for k in keys})
            job.commit_once(server, epoch, "stage", str(s), cid, dig)


def shard_model(job: Job) -> dict:
    """Servers plan stages and hire trainers; keys go to trainers; data and stage weights into the store."""
    from tdml_core.chain.market import TRAINER

    spec, m = job.spec, job.market
    client = job.people.client
    for p, server in enumerate(job.people.servers):
        trainers = job.people.trainers_of(p)
        if not m.c.functions.hiring_open(job.job_id, server.address).call():
            m.post_trainer_hiring(server.account, job.job_id, job.n_stages, 1)
        to_hire = []
        for s, trainer in enumerate(trainers):
            if m.role(job.job_id, trainer.address) == 0:
                offer = spec.trainers[s] if s < len(spec.trainers) else None
                memory = (offer.memory_bytes if offer and offer.memory_bytes else TRAINER_MEMORY)
                cpus = (offer.cpus if offer and offer.cpus else 1)
                m.offer_trainer(trainer.account, job.job_id, server.address, memory, cpus)
                to_hire.append(trainer.address)
            elif m.role(job.job_id, trainer.address) != TRAINER:
                raise ProtocolError(f"{trainer.address} holds another role in job {job.job_id}")
        if to_hire:
            m.hire_trainers(server.account, job.job_id, to_hire)
        for s, trainer in enumerate(trainers):
            _commit_public_key(job, trainer, f"trainer/{p}/{s}")
            _seal_to(job, server, f"trainer/{p}/{s}", "trainer-secrets", job.secrets)
        plan_doc = {"plan": job.plan.to_dict(), "trainers": [t.address for t in trainers]}
        cid, dig = job.put_doc(f"plan/{p}", plan_doc)
        job.commit_once(server, 0, "plan", str(p), cid, dig)
    # the client's data, sealed with the data key: one shard per pipeline and the test set
    ds = job.client_data
    classes = torch.tensor(ds.num_classes)
    for p in range(spec.data_parallel):
        if job.commitment(0, "data", str(p)) is None:
            x, y = shard(ds, p, spec.data_parallel, spec.seed)
            cid, dig = job.put_state(f"data/{p}", {"x": x, "y": y, "num_classes": classes}, key="data_key")
            job.commit_once(client, 0, "data", str(p), cid, dig)
    if job.commitment(0, "test", "set") is None:
        cid, dig = job.put_state("test", {"x": ds.test_x, "y": ds.test_y, "num_classes": classes}, key="data_key")
        job.commit_once(client, 0, "test", "set", cid, dig)
    init = job.commitment(0, "init", "model")
    if init is None:
        cid, dig = job.put_state("init", job.model.state_dict())
        job.commit_once(client, 0, "init", "model", cid, dig)
        init = job.must(0, "init", "model")
    if job.commitment(0, "stage", str(job.n_stages - 1)) is None:
        _put_stage_inputs(job, 0, job.get_state("init", init))
    return job.plan.to_dict()


# -- 5. train epoch -----------------------------------------------------------------------
def start_epoch(job: Job, epoch: int) -> int:
    """Server 0 marks an attempt at ``epoch``; a crashed attempt's commitments stay, under their own slots."""
    if job.ledger.global_epochs > epoch:
        raise ProtocolError(f"epoch {epoch} already has a global model; it is not trained twice")
    attempt = job.attempt(epoch) + 1
    mark = hashlib.sha256(f"{job.job_id}/{epoch}/{attempt}".encode()).hexdigest()
    job.commit_once(job.people.servers[0], epoch, "attempt", str(attempt), "", mark)
    return attempt


def train_pipeline(job: Job, pipeline: int, epoch: int, attempt: int) -> dict:
    """One pipeline's trainers fetch their stage and shard, train, and commit their digests."""
    from tdml_core.protocol.trainers import drop_trainers, trainer_cluster
    from tdml_core.runtime.cluster import StageFailure

    t0 = time.perf_counter()
    stage_in = [job.must(epoch, "stage", str(s)) for s in range(job.n_stages)]
    try:
        cluster = trainer_cluster(job, pipeline)
        t1 = time.perf_counter()
        stats = cluster.train_epoch_from_store(epoch, [{"cid": c.cid, "digest": c.digest} for c in stage_in])
        stats = stats[pipeline]
    except StageFailure:
        drop_trainers(job, pipeline)  # a retry starts this pipeline's trainers afresh
        raise
    t2 = time.perf_counter()
    for s, st in enumerate(stats):
        trainer = job.people.trainers[(pipeline, s)]
        slot = epoch_slot(f"{pipeline}/{s}", attempt)
        job.commit_once(trainer, epoch, "weights", slot, st["weights"]["cid"], st["weights"]["digest"])
        job.commit_once(trainer, epoch, "grad", slot, st["grad"]["cid"], st["grad"]["digest"])
    return {"pipeline": pipeline, "train_loss": stats[-1]["train_loss"], "batches": stats[-1]["batches"],
            "startup_s": t1 - t0, "train_s": t2 - t1, "commit_s": time.perf_counter() - t2}


def local_model(job: Job, pipeline: int, epoch: int, attempt: int) -> dict:
    """A pipeline's local model, put together from its trainers' committed stage weights."""
    state = {}
    for s in range(job.n_stages):
        c = job.must(epoch, "weights", epoch_slot(f"{pipeline}/{s}", attempt))
        state.update(job.get_state(f"weights/{pipeline}/{s}", c))
    return state


def score(job: Job, state: dict) -> tuple[float, float]:
    model = job.new_model()
    model.load_state_dict(state)
    x, y, _ = job.test_set()
    return evaluate(model, x, y)


# -- 6. cross-validate --------------------------------------------------------------------
def cross_validate(job: Job, pipeline: int, epoch: int, attempt: int) -> dict:
    """The next server round the ring scores ``pipeline``'s local model and commits the score."""
    n = job.spec.data_parallel
    validator = job.people.servers[validator_of(pipeline, n)]
    slot = epoch_slot(str(pipeline), attempt)
    have = job.commitment(epoch, "score", slot)
    if have is not None:
        return job.get_doc(f"score/{pipeline}", have)
    acc, loss = score(job, local_model(job, pipeline, epoch, attempt))
    doc = {"epoch": epoch, "attempt": attempt, "pipeline": pipeline, "accuracy": acc, "loss": loss,
           "validator": validator.address}
    cid, dig = job.put_doc(f"score/{pipeline}", doc)
    job.commit_once(validator, epoch, "score", slot, cid, dig)
    return doc


# -- 7. detect ----------------------------------------------------------------------------
def detect(job: Job, epoch: int, attempt: int, scores: list[dict]) -> dict:
    """Stage 1 flags far-below-median scores; stage 2 (gradients) has its place; evictions go on the ledger."""
    slot = epoch_slot("all", attempt)
    have = job.commitment(epoch, "verdicts", slot)
    if have is not None:
        return job.get_doc("verdicts", have)
    n = job.spec.data_parallel
    trainers = [[t.address for t in job.people.trainers_of(p)] for p in range(n)]
    flagged, verdicts = score_stage([sc["accuracy"] for sc in scores], job.spec.protocol.score_tolerance, trainers)
    verdicts = gradient_stage(flagged, verdicts)
    for v in verdicts:
        if v.malicious and not job.ledger.evicted(v.trainer):
            p = int(v.slot.split("/")[0])
            job.ledger.evict(job.people.servers[p].account, v.trainer, epoch, v.reason)
    doc = {"epoch": epoch, "attempt": attempt, "flagged": flagged, "verdicts": [v.to_dict() for v in verdicts]}
    cid, dig = job.put_doc("verdicts", doc)
    job.commit_once(job.people.servers[0], epoch, "verdicts", slot, cid, dig)
    return doc


# -- 8. aggregate ---------------------------------------------------------------------------
def choose(scores: list[dict], flagged: list[bool], top_k: int) -> list[int]:
    """The top-K local models among the unflagged ones (the rule the audit re-applies)."""
    eligible = [p for p, bad in enumerate(flagged) if not bad]
    if not eligible:
        raise ProtocolError("every local model was flagged; there is nothing to aggregate")
    best = select_top_k([scores[p]["accuracy"] for p in eligible], min(top_k, len(eligible)))
    return [eligible[i] for i in best]


def aggregate(job: Job, epoch: int, attempt: int, scores: list[dict], verdicts: dict) -> dict:
    """Average the top-K local models, commit the global model, and stage it for the next epoch."""
    chosen = choose(scores, verdicts["flagged"], job.spec.top_k)
    have = job.commitment(epoch, "global", "model")
    if have is None:
        global_state = average_states([local_model(job, p, epoch, attempt) for p in chosen])
        cid, dig = job.put_state("global", global_state)
        have = job.commit_once(job.people.servers[0], epoch, "global", "model", cid, dig)
    else:
        global_state = job.get_state("global", have)
    if epoch + 1 < job.spec.epochs:
        _put_stage_inputs(job, epoch + 1, global_state)
    acc, loss = score(job, global_state)
    return {"chosen": chosen, "global_model_cid": have.cid, "global_accuracy": acc, "global_loss": loss,
            "global_state": global_state}


# -- 9. reward ------------------------------------------------------------------------------
def work_done(job: Job, servers: list[str], trainers: dict[tuple[int, int], str]) -> dict[str, int]:
    """Verified units per participant address, counted from the ledger's commitments."""
    n, epochs = job.spec.data_parallel, job.ledger.global_epochs
    units = {a: 0 for a in [*servers, *trainers.values()]}
    for e in range(epochs):
        attempt = job.attempt(e)
        verdicts = job.get_doc("verdicts", job.must(e, "verdicts", epoch_slot("all", attempt)))
        for p in range(n):
            if job.commitment(e, "score", epoch_slot(str(p), attempt)) is not None:
                units[servers[validator_of(p, n)]] += 1
            for s in range(job.n_stages):
                slot = epoch_slot(f"{p}/{s}", attempt)
                committed = all(job.commitment(e, k, slot) is not None for k in ("weights", "grad"))
                if trainer_earns(verdicts, p, s, committed):
                    units[trainers[(p, s)]] += 1
    return units


def reward(job: Job) -> dict:
    """Credit verified work, finish the ledger, settle: the contract pays everyone and refunds the rest."""
    from tdml_core.chain.market import TRAINER

    client, m, ledger = job.people.client, job.market, job.ledger
    if not ledger.finished:
        servers = [s.address for s in job.people.servers]
        trainers = {k: t.address for k, t in job.people.trainers.items()}
        for address, units in work_done(job, servers, trainers).items():
            owed = units - ledger.work(address)
            if owed <= 0 or ledger.evicted(address):
                continue
            if m.role(job.job_id, address) == TRAINER:
                server = m.c.functions.server_of(job.job_id, address).call()
                payer = next(s for s in job.people.servers if s.address == server)
                ledger.credit(payer.account, address, owed)
            else:
                ledger.credit(client.account, address, owed)
        ledger.finish(client.account)
    if not m.task(job.job_id)["settled"]:
        m.settle(client.account, job.job_id)
    budget = job.spec.protocol.budget_wei
    rewards = {a: ledger.earned(a) for a in [p.address for p in job.people.everyone[1:]]}
    return {"rewards": rewards, "refund_wei": budget - sum(rewards.values()),
            "evicted": [f"{p}/{s}" for (p, s), t in sorted(job.people.trainers.items()) if ledger.evicted(t.address)]}
