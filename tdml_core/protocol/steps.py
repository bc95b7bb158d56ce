"""The protocol's steps, in the order of the protocol table.

Every step is safe to run again (a retried task, a resumed run): it first reads
what the ledger already holds and only does what is missing. Every write is
signed by the participant whose act it is.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import torch

from tdml_core.artifacts import doc_bytes
from tdml_core.config import JobSpec
from tdml_core.chain.market import MAX_PIPELINES, MAX_STAGES, Kind, Slot
from tdml_core.config import SpecError
from tdml_core.crypto import digest
from tdml_core.data import shard
from tdml_core.identity import Identity, seal_secrets
from tdml_core.model import split_model
from tdml_core.model.split import quiet_trace_warnings
from tdml_core.protocol.job import GAS_FUNDS_WEI, Job, JobRef, ProtocolError, load_participants
from tdml_core.protocol.keys import JobKeys
from tdml_core.protocol.rewards import refund, trainer_earns, validator_of
from tdml_core.robust.validate import evaluate
from tdml_core.runtime.context import load_job, make_plan
from tdml_core.services import resolve_chain, resolve_store

_TRACE_LOCK = threading.Lock()
SERVER_MEMORY = 16 * 2**30  # what a local parameter server offers on the market
TRAINER_MEMORY = 8 * 2**30  # a local trainer's offer when the spec names no memory


def _spec_doc(spec: JobSpec) -> dict:
    return spec.model_dump(mode="json")


# -- 0. open the run folder ---------------------------------------------------------
def check_run_folder(out_dir: str | Path, resume: bool) -> None:
    """A new job needs a folder without one, that it can create and write in; resuming needs the job that is there.

    A new job's folder is created here (``paths.FolderError`` when it is a file or cannot be created or written).
    """
    from tdml_core.paths import check_out_folder

    out = Path(out_dir)
    if resume:
        JobRef.load(out)  # says clearly when there is no job to resume
        check_out_folder(out)
    elif (out / "job.json").exists():
        old = JobRef.load(out)
        raise ProtocolError(
            f"{out_dir} already holds job {old.job_id}; pass --resume to continue it, or choose another --out"
        )
    else:
        check_out_folder(out)


def prepare(spec: JobSpec, out_dir: str | Path, resume: bool = False, chain: str | None = None,
            store: str | None = None) -> Job:
    """Open (or re-open, to resume) the job in ``out_dir``: keys, chain, store; fund gas.

    Everything a user can get wrong (the spec, its data, its model, the market's
    limits, the folder) is checked before any key is made or any transaction sent.
    """
    out = Path(out_dir).resolve()
    check_run_folder(out_dir, resume)
    ds, model = load_job(spec)
    plan = make_plan(spec, model, ds)
    if spec.data_parallel > MAX_PIPELINES:
        raise SpecError(f"data_parallel ({spec.data_parallel}) exceeds the market's limit of {MAX_PIPELINES} pipelines")
    if plan.n_stages > MAX_STAGES:
        raise SpecError(f"the plan has {plan.n_stages} stages; the market allows at most {MAX_STAGES}")
    if resume:
        ref = JobRef.load(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        store_url = resolve_store(store or spec.protocol.store or "local:store")  # local: inside the run folder
        ref = JobRef(out_dir=str(out), chain=resolve_chain(chain or spec.protocol.chain), store=store_url,
                     salt=os.urandom(32).hex())
    job = Job(ref, spec, None)
    job.client_data, job.model, job.plan = ds, model, plan
    job.n_stages = plan.n_stages
    job.people = load_participants(spec, job.n_stages, out / "keys")
    job.ref.chain_id = job.chain.chain_id
    if job.market is not None and job.ref.job_id is not None and job.ledger is None:
        job.ledger = job.market.ledger_of(job.job_id)  # opened before a crash that kept it out of job.json
        if job.ledger is not None:
            job.ref.ledger, job.ref.ledger_block = job.ledger.address, job.market.task(job.job_id)["ledger_block"]
    if job.ledger is not None:
        job.sync_holders()  # replacements made before a crash
    if resume and job.ledger is not None:
        have = job.commitment(0, Kind.SPEC)
        if have is not None and have.digest.removeprefix("0x") != digest(doc_bytes(_spec_doc(spec))):
            raise ProtocolError(f"this spec is not the one job {job.job_id} was published with")
    for who in job.people.everyone:
        _fund(job, who.address, GAS_FUNDS_WEI + (spec.protocol.budget_wei if who is job.people.client
                                                 else spec.protocol.bond_wei))
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
def _market_address(job: Job, nonce: int) -> str:
    """Where the client's deployment of the market lands: the blueprint at ``nonce``, the market after it."""
    import rlp
    from eth_utils import keccak, to_canonical_address, to_checksum_address

    sender = to_canonical_address(job.people.client.address)
    return to_checksum_address(keccak(rlp.encode([sender, nonce + 1]))[12:])


def publish_task(job: Job) -> int:
    """The client publishes the task under its salt with the budget escrowed (deploying a market if none is given).

    Each transaction is found again after a crash at any point: the market at the
    address the client's recorded nonce gives, the task by (client, salt).
    """
    from tdml_core.chain.market import MarketClient

    client, spec = job.people.client, job.spec
    if job.ref.market is None:
        nonce = job.ref.deploy_nonce
        if nonce is not None and job.chain.w3.eth.get_code(_market_address(job, nonce)):
            job.market = MarketClient(job.chain, _market_address(job, nonce))
        else:
            job.ref.deploy_nonce = job.chain.nonce(client.address)
            job.save_ref()
            job.market = MarketClient.deploy(job.chain, client.account)
        job.ref.market = job.market.address
        job.save_ref()
    if job.ref.job_id is None:
        salt = bytes.fromhex(job.ref.salt)
        found = job.market.find_task(client.address, salt)
        if found is None:
            deadline = job.chain.timestamp() + spec.protocol.deadline_s
            found, _ = job.market.publish_task(
                client.account, salt, spec.name[:64], spec.protocol.budget_wei, splits=spec.data_parallel,
                stages=job.n_stages, epochs=spec.rounds, deadline=deadline, pubkey=client.public_key,
                bond_wei=spec.protocol.bond_wei,
            )
        job.ref.job_id = found
        job.save_ref()
    return job.job_id


# -- 2. hire parameter servers -------------------------------------------------------------
def hire_parameter_servers(job: Job) -> list[str]:
    """Servers register for the task (each signing, with its bond and key); the client hires one per pipeline."""
    from tdml_core.chain.market import SERVER

    m, client, task_id = job.market, job.people.client, job.job_id
    for server in job.people.servers:
        if m.role(task_id, server.address) == 0 and not m.registered(task_id, server.address):
            m.register(server.account, task_id, SERVER_MEMORY, os.cpu_count() or 1, server.public_key,
                       job.spec.protocol.bond_wei)
    hired = m.task(task_id)["servers"]
    if hired < len(job.people.servers):
        m.hire_servers(client.account, task_id, [s.address for s in job.people.servers[hired:]])
    for p, server in enumerate(job.people.servers):
        if m.role(task_id, server.address) != SERVER or m.server_at(task_id, p) != server.address:
            raise ProtocolError(f"{server.address} is not the hired server of pipeline {p} in job {task_id}")
    return [s.address for s in job.people.servers]


# -- 3. hire trainers ----------------------------------------------------------------------
def hire_trainers(job: Job) -> str:
    """Each server posts its hiring message; trainers offer; the server hires one per stage; the ledger opens.

    Opening the ledger closes hiring, so it comes last; a crash after it finds
    the ledger again on the market.
    """
    spec, m, task_id = job.spec, job.market, job.job_id
    for p, server in enumerate(job.people.servers):
        if not m.hiring_open(task_id, server.address):
            m.post_trainer_hiring(server.account, task_id, job.n_stages, 1)
        to_hire, stages = [], []
        for s, trainer in enumerate(job.people.trainers_of(p)):
            holder = m.holder(task_id, p, s)
            if int(holder, 16) != 0:
                if holder != trainer.address:
                    raise ProtocolError(f"stage {s} of pipeline {p} is held by {holder}, not {trainer.address}")
                continue
            if not m.offered(task_id, trainer.address):
                offer = spec.trainers[s] if s < len(spec.trainers) else None
                memory = (offer.memory_bytes if offer and offer.memory_bytes else TRAINER_MEMORY)
                cpus = (offer.cpus if offer and offer.cpus else 1)
                m.offer_trainer(trainer.account, task_id, server.address, memory, cpus, trainer.public_key,
                                spec.protocol.bond_wei)
            to_hire.append(trainer.address)
            stages.append(s)
        if to_hire:
            m.hire_trainers(server.account, task_id, to_hire, stages)
    n = len(job.people.servers)
    for i, standby in enumerate(job.people.standbys):  # offers stay open after hiring closes: replacements
        if not m.offered(task_id, standby.address) and m.role(task_id, standby.address) == 0:
            m.offer_trainer(standby.account, task_id, job.people.servers[i % n].address, TRAINER_MEMORY, 1,
                            standby.public_key, spec.protocol.bond_wei)
    if job.ref.ledger is None:
        ledger = m.ledger_of(task_id)
        if ledger is None:
            ledger, _ = m.open_ledger(job.people.client.account, task_id)
        job.ledger = ledger
        job.ref.ledger = ledger.address
        job.ref.ledger_block = m.task(task_id)["ledger_block"]
        job.save_ref()
    return job.ledger.address


# -- 4. key exchange ------------------------------------------------------------------------
def _seal_to(job: Job, sender: Identity, receiver: str, slot: Slot, role: str, secrets: dict) -> None:
    if job.ledger.commitment(slot) is not None:
        return
    envelope = seal_secrets(sender, job.public_key(receiver), job.job_id, role, secrets)
    job.commit_once(sender, slot, job.store.put(envelope), digest(envelope))


def exchange_keys(job: Job) -> None:
    """The client makes the job's keys and hands each participant only the ones it needs (see keys.py)."""
    client = job.people.client
    if job.commitment(0, Kind.CLIENT_KEYS) is None:
        job.set_keys(JobKeys.new())
        _seal_to(job, client, client.address, Slot(0, Kind.CLIENT_KEYS), "client-keys", job.keys.for_client())
    keys = job.keys  # opened from the ledger when this step runs again
    for p, server in enumerate(job.people.servers):
        refereed = (p - 1) % job.spec.data_parallel  # the pipeline it validates and whose trainers it re-checks
        _seal_to(job, client, server.address, Slot(0, Kind.SERVER_KEYS, p), "server-keys", keys.for_server(refereed))
        for s in range(job.n_stages):
            seal_trainer(job, p, s)
    if job.commitment(0, Kind.SPEC) is None:
        cid, dig = job.put_doc(Kind.SPEC, _spec_doc(job.spec))
        job.commit_once(client, Slot(0, Kind.SPEC), cid, dig)


def seal_trainer(job: Job, p: int, s: int) -> None:
    """The client seals pipeline p's data key, and its server the stage's keys, to the slot's current trainer."""
    trainer, g = job.people.trainers[(p, s)], job.generation(p, s)
    keys = job.keys
    _seal_to(job, job.people.client, trainer.address, Slot(0, Kind.DATA_KEY, p, s, g), "data-key",
             keys.for_trainer_data(p))
    _seal_to(job, job.people.servers[p], trainer.address, Slot(0, Kind.TRAINER_KEYS, p, s, g), "trainer-keys",
             keys.for_trainer(p, s))


# -- 5. shard model -------------------------------------------------------------------------
def stage_keys(job: Job) -> list[list[str]]:
    """Which entries of the model's state each stage holds (the same split every trainer makes)."""
    if job._stage_keys is None:
        quiet_trace_warnings()
        x, _, _ = job.eval_set()
        stages = split_model(job.new_model(), job.plan, x[: job.spec.microbatch_size].clone())
        job._stage_keys = [sorted(m.state_dict().keys()) for m in stages]
    return job._stage_keys


def _put_stage_inputs(job: Job, epoch: int, state: dict) -> None:
    """The aggregating server puts each stage's slice of the global model in the store for ``epoch``."""
    server = job.people.servers[0]
    for s, keys in enumerate(stage_keys(job)):
        if job.commitment(epoch, Kind.STAGE, 0, s) is None:
            cid, dig = job.put_state(Kind.STAGE, {k: state[k] for k in keys}, stage=s)
            job.commit_once(server, Slot(epoch, Kind.STAGE, 0, s), cid, dig)


def shard_model(job: Job) -> dict:
    """Servers commit their plans; the client its data shards, validation set, initial model and epoch 0's stage inputs."""
    spec, client = job.spec, job.people.client
    for p, server in enumerate(job.people.servers):
        if job.commitment(0, Kind.PLAN, p) is None:
            plan_doc = {"plan": job.plan.to_dict(), "trainers": [t.address for t in job.people.trainers_of(p)]}
            cid, dig = job.put_doc(Kind.PLAN, plan_doc, p)
            job.commit_once(server, Slot(0, Kind.PLAN, p), cid, dig)
    # the client's data: one shard per pipeline under that pipeline's key, the validation set under the servers';
    # the test set stays with the client
    ds = job.client_data
    classes = torch.tensor(ds.num_classes)
    for p in range(spec.data_parallel):
        if job.commitment(0, Kind.DATA, p) is None:
            x, y = shard(ds, p, spec.data_parallel, spec.seed)
            cid, dig = job.put_state(Kind.DATA, {"x": x, "y": y, "num_classes": classes}, p)
            job.commit_once(client, Slot(0, Kind.DATA, p), cid, dig)
    if job.commitment(0, Kind.EVAL) is None:
        cid, dig = job.put_state(Kind.EVAL, {"x": ds.val_x, "y": ds.val_y, "num_classes": classes})
        job.commit_once(client, Slot(0, Kind.EVAL), cid, dig)
    init = job.commitment(0, Kind.INIT)
    if init is None:
        cid, dig = job.put_state(Kind.INIT, job.model.state_dict())
        init = job.commit_once(client, Slot(0, Kind.INIT), cid, dig)
    if job.ledger.global_epochs == 0 and job.commitment(0, Kind.STAGE, 0, job.n_stages - 1) is None:
        _put_stage_inputs(job, 0, job.get_state(init, Kind.INIT))
    return job.plan.to_dict()


# -- 6. train epoch -----------------------------------------------------------------------
def start_epoch(job: Job, epoch: int) -> int:
    """Server 0 marks an attempt at ``epoch``; a crashed attempt's commitments stay, under their own attempt."""
    if job.ledger.global_epochs > epoch:
        raise ProtocolError(f"epoch {epoch} already has a global model; it is not trained twice")
    attempt = job.attempt(epoch) + 1
    mark = hashlib.sha256(f"{job.job_id}/{epoch}/{attempt}".encode()).hexdigest()
    job.commit_once(job.people.servers[0], Slot(epoch, Kind.ATTEMPT, attempt=attempt), "", mark)
    return attempt


def train_pipeline(job: Job, pipeline: int, epoch: int, attempt: int) -> dict:
    """One pipeline's trainers fetch their stage and shard, train, and commit their digests."""
    from tdml_core.protocol.trainers import drop_trainers, has_trainers, trainer_cluster
    from tdml_core.runtime.cluster import StageFailure

    t0 = time.perf_counter()
    stage_in = [job.must(epoch, Kind.STAGE, 0, s) for s in range(job.n_stages)]
    restarted = job.restarted.pop(pipeline, [])
    try:
        cluster = trainer_cluster(job, pipeline)
        t1 = time.perf_counter()
        stats = cluster.train_epoch_from_store(epoch, [{"cid": c.cid, "digest": c.digest} for c in stage_in])
        stats = stats[pipeline]
    except StageFailure as exc:
        if has_trainers(job, pipeline):  # their processes (and optimizer state) are gone; a retry starts new ones
            job.restarted[pipeline] = [f"{pipeline}/{s}" for s in range(job.n_stages)]
            job.failures.setdefault(pipeline, []).append(str(exc).splitlines()[0])
        drop_trainers(job, pipeline)
        raise
    t2 = time.perf_counter()
    for s, st in enumerate(stats):
        commit_work(job, pipeline, s, epoch, attempt, st)
    return {"pipeline": pipeline, "train_loss": stats[-1]["train_loss"], "batches": stats[-1]["batches"],
            "restarted": restarted, "failures": job.failures.pop(pipeline, []) if restarted else [],
            "startup_s": t1 - t0, "train_s": t2 - t1, "commit_s": time.perf_counter() - t2,
            # the trainers' CPU time in the epoch, and of it their records' (cloning, hashing, signing)
            "cpu_s": sum(st.get("cpu_s", 0.0) for st in stats),
            "record_cpu_s": sum(st.get("record_cpu_s", 0.0) for st in stats)}


UNRECORDED = "00" * 32  # the root a trainer commits when the spec turns verification off


def commit_work(job: Job, pipeline: int, stage: int, epoch: int, attempt: int, stats: dict) -> None:
    """The trainer's one transaction of the epoch: its weights, its epoch gradient and its records' Merkle root."""
    if job.commitment(epoch, Kind.WEIGHTS, pipeline, stage, attempt) is not None:
        return  # a retried step: committed before it failed
    trainer = job.people.trainers[(pipeline, stage)]
    w, g = stats["weights"], stats["grad"]
    root = (stats.get("record") or {}).get("root", UNRECORDED)
    job.ledger.commit_work(trainer.account, epoch, pipeline, stage, attempt, (w["cid"], w["digest"]),
                           (g["cid"], g["digest"]), "", root)


def local_model(job: Job, pipeline: int, epoch: int, attempt: int) -> dict:
    """A pipeline's local model, put together from its trainers' committed stage weights."""
    state = {}
    for s in range(job.n_stages):
        c = job.must(epoch, Kind.WEIGHTS, pipeline, s, attempt)
        state.update(job.get_state(c, Kind.WEIGHTS, pipeline, s))
    return state


def _loaded(job: Job, state: dict) -> torch.nn.Module:
    model = job.new_model()
    model.load_state_dict(state)
    return model


def score(job: Job, state: dict) -> tuple[float, float]:
    """(accuracy, loss) of a model on the validation set: what servers score and select with."""
    x, y, _ = job.eval_set()
    return evaluate(_loaded(job, state), x, y)


def global_scores(job: Job, state: dict, with_test: bool = True) -> tuple[tuple[float, float], tuple | None]:
    """A global model's (accuracy, loss) on the validation set, and on the client's test set (what is reported,
    never what selects; None without ``with_test``): the model is built once for both."""
    model = _loaded(job, state)
    x, y, _ = job.eval_set()
    return evaluate(model, x, y), (evaluate(model, *job.test_set()) if with_test else None)


# -- 7. cross-validate --------------------------------------------------------------------
def cross_validate(job: Job, pipeline: int, epoch: int, attempt: int) -> dict:
    """The next server round the ring scores ``pipeline``'s local model and commits the score."""
    n = job.spec.data_parallel
    validator = job.people.servers[validator_of(pipeline, n)]
    have = job.commitment(epoch, Kind.SCORE, pipeline, 0, attempt)
    if have is not None:
        return job.get_doc(have, Kind.SCORE, pipeline)
    acc, loss = score(job, local_model(job, pipeline, epoch, attempt))
    doc = {"epoch": epoch, "attempt": attempt, "pipeline": pipeline, "accuracy": acc, "loss": loss,
           "validator": validator.address}
    cid, dig = job.put_doc(Kind.SCORE, doc, pipeline)
    job.commit_once(validator, Slot(epoch, Kind.SCORE, pipeline, 0, attempt), cid, dig)
    return doc


# -- 7b. verify work ----------------------------------------------------------------------------
def challenge_seed(job: Job, epoch: int, attempt: int) -> tuple[int, bytes]:
    """The hash of the first block after the epoch's last work commitment: nobody knew it when committing."""
    block = job.ledger.last_work_block(epoch, attempt) + 1
    chain = job.chain
    deadline = time.monotonic() + 120
    while chain.w3.eth.block_number < block:
        if chain.url == "embedded":  # blocks are mined by transactions only: one that moves nothing
            chain.fund(chain.faucet.address, 0)
        elif time.monotonic() > deadline:
            raise ProtocolError(f"the chain mined no block after {block - 1} in 120 s: the challenges cannot be drawn")
        else:
            time.sleep(0.5)
    return block, block_seed(chain, block)


def block_seed(chain, block: int) -> bytes:
    """The challenge seed a mined block gives: its hash."""
    return bytes(chain.w3.eth.get_block(block)["hash"])


def referee_of(job: Job, pipeline: int):
    """The verifier that the referee of ``pipeline`` (the server of pipeline + 1) runs: its own stage modules."""
    from tdml_core.model.split import quiet_trace_warnings
    from tdml_core.verify.referee import Referee

    refs = job.__dict__.setdefault("_referees", {})
    with _TRACE_LOCK:  # torch.export traces one model at a time in a process
        if "_split" not in job.__dict__:
            quiet_trace_warnings()
            x, _, _ = job.eval_set()
            job._split = split_model(job.new_model(), job.plan, x[: job.spec.microbatch_size].clone())
    if pipeline not in refs:
        import copy

        modules = copy.deepcopy(job._split)

        def shard_of(p: int):
            doc = job.get_state(job.must(0, Kind.DATA, p), Kind.DATA, p)
            return doc["x"], doc["y"]

        refs[pipeline] = Referee(job.spec, job.plan, modules=modules, shard_of=shard_of)
    return refs[pipeline]


def open_reveal(job: Job, pipeline: int, stage: int, ref: dict) -> dict:
    """A trainer's answer to its challenge, fetched by id and checked against its digest."""
    from tdml_core.artifacts import open_sealed
    from tdml_core.protocol.keys import reveal_role
    from tdml_core.verify.records import reveal_from_bytes

    key = job.keys.for_kind(Kind.WEIGHTS, pipeline, stage)
    raw = open_sealed(key, bytes(job.store.get(ref["cid"])), job.job_id, reveal_role(pipeline, stage), ref["cid"],
                      ref["digest"])
    return reveal_from_bytes(raw)


def draw_challenges(job: Job, pipeline: int, epoch: int, attempt: int, seed: bytes) -> tuple[dict, dict, dict]:
    """(records, who, steps) of ``pipeline``'s trainers: each one's committed root and leaf count, its address,
    and the steps ``seed`` draws for it."""
    ref = referee_of(job, pipeline)
    records, who = {}, {}
    for s in range(job.n_stages):
        root = job.must(epoch, Kind.ROOT, pipeline, s, attempt)
        records[(pipeline, s)] = {"root": root.digest, "leaves": ref.n_leaves(pipeline, epoch)}
        who[(pipeline, s)] = root.writer
    return records, who, ref.challenges(seed, records, who)


def check_trainers(job: Job, pipeline: int, epoch: int, attempt: int, seed: bytes,
                   reveals: dict[tuple[int, int], dict]) -> list[dict]:
    """Draw each trainer's steps from ``seed``, open what it revealed, re-run them: one entry per trainer.

    ``reveals[slot]`` is the id and digest of its answer ({"cid", "digest"}), or {"error": why} when it gave
    none. The detect step and the audit both call this, on the same committed inputs.
    """
    records, who, steps = draw_challenges(job, pipeline, epoch, attempt, seed)
    opened, answers, out = {}, {}, []
    for slot in steps:
        answer = answers[slot] = reveals.get(slot) or {"error": "no answer"}
        if "cid" in answer:
            try:
                opened[slot] = open_reveal(job, *slot, answer)
            except Exception as exc:  # a damaged or forged answer is a failed reveal, not a crash
                answers[slot] = {**answer, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    found = referee_of(job, pipeline).judge(epoch, records, steps, opened, who)
    for slot, verdict in found.items():
        answer = answers[slot]
        findings = [f.as_doc() for f in verdict.findings]
        if slot not in opened:
            why = answer.get("error", "no answer")
            findings = [{**f, "detail": f"no answer to the challenge ({why})"} for f in findings]
        out.append({"slot": f"{slot[0]}/{slot[1]}", "trainer": who[slot], "root": records[slot]["root"],
                    "leaves": records[slot]["leaves"], "steps": verdict.steps,
                    "reveal": {k: answer[k] for k in ("cid", "digest") if k in answer} or None,
                    "failed": verdict.failed, "findings": findings})
    return out


def verify_work(job: Job, pipeline: int, epoch: int, attempt: int) -> dict | None:
    """The referee of ``pipeline`` challenges its trainers, re-runs what they reveal and commits the findings."""
    from tdml_core.protocol.trainers import running_cluster
    from tdml_core.runtime.cluster import StageFailure

    spec = job.spec
    if not spec.verification.enabled:
        return None
    have = job.commitment(epoch, Kind.CHECKS, pipeline, 0, attempt)
    if have is not None:
        return job.get_doc(have, Kind.CHECKS, pipeline)
    referee = job.people.servers[validator_of(pipeline, spec.data_parallel)]
    doc = {"epoch": epoch, "attempt": attempt, "pipeline": pipeline, "referee": referee.address}
    cluster = running_cluster(job, pipeline)
    if spec.protocol.pipeline_pool is not None and cluster is None:
        doc["skipped"] = "the pipeline trained on a work pool, whose stage processes close after the epoch"
    else:
        t0 = time.perf_counter()
        block, seed = challenge_seed(job, epoch, attempt)
        _, _, steps = draw_challenges(job, pipeline, epoch, attempt, seed)
        reveals: dict = {}
        if cluster is None:
            reveals = {slot: {"error": "its stage process is not running"} for slot in steps}
        else:
            try:
                reveals = cluster.reveal(steps, epoch)
            except StageFailure as exc:  # the failing trainer gave no answer; the others were not asked to finish
                from tdml_core.protocol.trainers import drop_trainers

                reveals = {(exc.pipeline, exc.stage): {"error": str(exc).splitlines()[0][:200]}}
                drop_trainers(job, pipeline)
        t1 = time.perf_counter()
        doc.update(seed_block=block, seed=seed.hex(),
                   trainers=check_trainers(job, pipeline, epoch, attempt, seed, reveals),
                   reveal_s=t1 - t0, recompute_s=time.perf_counter() - t1)
    cid, dig = job.put_doc(Kind.CHECKS, doc, pipeline)
    job.commit_once(referee, Slot(epoch, Kind.CHECKS, pipeline, 0, attempt), cid, dig)
    return doc


def epoch_checks(job: Job, epoch: int, attempt: int, pipelines: list[int]) -> dict[int, dict | None]:
    """The committed checks document of each pipeline (None where none was committed)."""
    out = {}
    for p in pipelines:
        c = job.commitment(epoch, Kind.CHECKS, p, 0, attempt)
        out[p] = None if c is None else job.get_doc(c, Kind.CHECKS, p)
    return out


# -- 8. detect ----------------------------------------------------------------------------
def dropped_pipelines(job: Job) -> list[int]:
    """Pipelines that train no more: a trainer of theirs was evicted and no standby took its slot."""
    return sorted({p for (p, s), t in job.people.trainers.items() if job.ledger.evicted(t.address)})


def epoch_updates(job: Job, epoch: int, attempt: int, pipelines: list[int]) -> tuple[dict, dict, dict]:
    """Each trainer's update in the epoch (its committed weights minus the stage input), its epoch gradient, its address."""
    from tdml_core.robust.combine import _floats

    updates, grads, writers = {}, {}, {}
    for s in range(job.n_stages):
        start = job.get_state(job.must(epoch, Kind.STAGE, 0, s), Kind.STAGE, stage=s)
        names = _floats(start)
        for p in pipelines:
            w = job.must(epoch, Kind.WEIGHTS, p, s, attempt)
            end = job.get_state(w, Kind.WEIGHTS, p, s)
            g = job.get_state(job.must(epoch, Kind.GRAD, p, s, attempt), Kind.GRAD, p, s)
            updates[(p, s)] = {k: (end[k].double() - start[k].double()).numpy() for k in names}
            grads[(p, s)] = {k: v.double().numpy() for k, v in g.items()}
            writers[(p, s)] = w.writer
    return updates, grads, writers


def flag_history(job: Job, epoch: int) -> dict[str, list[bool]]:
    """Each trainer's flags in the epochs before ``epoch``, oldest first, from the committed verdicts."""
    history: dict[str, list[bool]] = {}
    for e in range(epoch):
        doc = job.get_doc(job.must(e, Kind.VERDICTS, attempt=job.attempt(e)), Kind.VERDICTS)
        for v in doc["verdicts"]:
            history.setdefault(v["trainer"], []).append(bool(v.get("flagged", v["malicious"])))
    return history


def judge(job: Job, epoch: int, attempt: int, scores: list[dict | None]) -> dict:
    """The verdicts document of an epoch, from committed artifacts only (the audit calls it too)."""
    from tdml_core.robust.judge import judge_epoch

    active = [p for p, sc in enumerate(scores) if sc is not None]
    updates, grads, writers = epoch_updates(job, epoch, attempt, active)
    fresh = []  # pipelines whose processes started anew with a replacement: a slot's writer changed
    if epoch > 0:
        before = job.attempt(epoch - 1)
        for p in active:
            if any((c := job.commitment(epoch - 1, Kind.WEIGHTS, p, s, before)) is not None
                   and c.writer != writers[(p, s)] for s in range(job.n_stages)):
                fresh.append(p)
    doc = judge_epoch([None if sc is None else sc["accuracy"] for sc in scores], updates, grads, writers,
                      flag_history(job, epoch), n_stages=job.n_stages, tolerance=job.spec.protocol.score_tolerance,
                      detection=job.spec.detection, fresh=fresh)
    from tdml_core.verify import proofs

    doc = proofs.apply(doc, epoch_checks(job, epoch, attempt, active))
    return {"epoch": epoch, "attempt": attempt, **doc}


def detect(job: Job, epoch: int, attempt: int, scores: list[dict | None]) -> dict:
    """Stage 1 on the scores, stage 2 on the updates; evictions go on the ledger, signed by the trainer's server."""
    have = job.commitment(epoch, Kind.VERDICTS, attempt=attempt)
    if have is not None:
        doc = job.get_doc(have, Kind.VERDICTS)
    else:
        doc = judge(job, epoch, attempt, scores)
        cid, dig = job.put_doc(Kind.VERDICTS, doc)
        job.commit_once(job.people.servers[0], Slot(epoch, Kind.VERDICTS, attempt=attempt), cid, dig)
    n = job.spec.data_parallel
    for v in doc["verdicts"]:
        p = int(v["slot"].split("/")[0])
        if v.get("proven") and not job.ledger.forfeited(v["trainer"]):  # the referee convicts on its proof
            proof = job.must(epoch, Kind.CHECKS, p, 0, attempt).digest
            job.ledger.convict(job.people.servers[validator_of(p, n)].account, v["trainer"], epoch,
                               v["reason"][:100], proof)
        elif v["malicious"] and not job.ledger.evicted(v["trainer"]):
            job.ledger.evict(job.people.servers[p].account, v["trainer"], epoch, v["reason"][-100:])
    return doc


def replace_evicted(job: Job, verdicts: dict | None = None) -> list[dict]:
    """Each trainer evicted this epoch: its server hires a standby that offered to it and seals it the slot's keys.

    Without a standby the pipeline is dropped (it trains no more). Its processes
    are stopped either way, so that the next epoch starts them with the new trainer.
    Without ``verdicts`` (a run resumed after a crash between an eviction and its
    replacement) every evicted holder that a standby can still replace is replaced.
    """
    from tdml_core.chain.market import TRAINER
    from tdml_core.protocol.trainers import drop_trainers

    m, task = job.market, job.job_id
    done = []
    now = None if verdicts is None else {v["trainer"] for v in verdicts["verdicts"] if v["malicious"]}
    for (p, s), trainer in sorted(job.people.trainers.items()):
        if not job.ledger.evicted(trainer.address) or (now is not None and trainer.address not in now):
            continue
        server = job.people.servers[p]
        free = [sb for sb in job.people.standbys if m.role(task, sb.address) == 0
                and m.offer_server(task, sb.address) == server.address]
        if not free and now is None:
            continue  # already dropped
        drop_trainers(job, p)
        if not free:
            done.append({"slot": f"{p}/{s}", "evicted": trainer.address, "replacement": None})
            continue
        new = free[0]
        m.replace_trainer(server.account, task, trainer.address, new.address)
        assert m.role(task, new.address) == TRAINER
        job.people.replace(p, s, new)
        seal_trainer(job, p, s)
        done.append({"slot": f"{p}/{s}", "evicted": trainer.address, "replacement": new.address})
    return done


# -- 9. aggregate ---------------------------------------------------------------------------
def epoch_start(job: Job, epoch: int) -> dict:
    """The global model ``epoch`` started from, put together from the stage inputs the aggregator committed."""
    start = {}
    for s in range(job.n_stages):
        start.update(job.get_state(job.must(epoch, Kind.STAGE, 0, s), Kind.STAGE, stage=s))
    return start


def committed_scores(job: Job, epoch: int, attempt: int) -> list[dict | None]:
    """Each pipeline's committed score of ``epoch`` (None: the pipeline was dropped)."""
    out = []
    for p in range(job.spec.data_parallel):
        c = job.commitment(epoch, Kind.SCORE, p, 0, attempt)
        out.append(None if c is None else job.get_doc(c, Kind.SCORE, p))
    return out


def _outer_buffers(job: Job) -> dict[int, dict]:
    return job.__dict__.setdefault("_outer_buffers", {})


def outer_buffer(job: Job, epoch: int) -> dict | None:
    """The outer optimizer's momentum buffer after ``epoch``, re-derived from the committed epochs (cached).

    A function of each epoch's start and combination alone, so a resumed run and the audit
    reach the one the uninterrupted run held: an epoch not seen in this process is rebuilt
    by ``global_model`` from its committed scores and verdicts, which caches its buffer.
    """
    if epoch < 0 or job.spec.aggregation.outer_momentum == 0.0:
        return None
    cache = _outer_buffers(job)
    if epoch not in cache:
        a = job.attempt(epoch)
        verdicts = job.get_doc(job.must(epoch, Kind.VERDICTS, attempt=a), Kind.VERDICTS)
        global_model(job, epoch, a, committed_scores(job, epoch, a), verdicts)
    return cache[epoch]


def global_model(job: Job, epoch: int, attempt: int, scores: list[dict | None], verdicts: dict,
                 start: dict | None = None) -> tuple[dict, list[int], str]:
    """The rule the spec names over the unflagged local models, then the outer step (the audit calls it too)."""
    from tdml_core.robust.combine import combine
    from tdml_core.robust.outer import is_plain, step_by

    agg = job.spec.aggregation
    eligible = [p for p, bad in enumerate(verdicts["flagged"]) if not bad and scores[p] is not None]
    if not eligible:
        raise ProtocolError(f"epoch {epoch}: every local model was flagged; there is nothing to aggregate")
    plain = is_plain(agg.outer_lr, agg.outer_momentum)
    if start is None and (agg.rule != "top_k" or not plain):
        start = epoch_start(job, epoch)
    states = {p: local_model(job, p, epoch, attempt) for p in eligible}
    accs = [None if sc is None else sc["accuracy"] for sc in scores]
    combined, chosen, rule = combine(agg.rule, start or {}, states, accs, eligible, top_k=job.spec.top_k, f=agg.f,
                                     tau=agg.tau, iters=agg.iters)
    if plain:
        return combined, chosen, rule
    state, buffer = step_by(agg, start, combined, outer_buffer(job, epoch - 1))
    if buffer is not None:
        _outer_buffers(job)[epoch] = buffer
    kind = "Nesterov" if agg.nesterov else "heavy-ball"
    return state, chosen, f"{rule}, outer step lr {agg.outer_lr:g}" + (
        f" with {kind} momentum {agg.outer_momentum:g}" if agg.outer_momentum else "")


def aggregate(job: Job, epoch: int, attempt: int, scores: list[dict | None], verdicts: dict) -> dict:
    """Combine the unflagged local models, commit the global model, and stage it for the next epoch."""
    have = job.commitment(epoch, Kind.GLOBAL, attempt=attempt)
    global_state, chosen, rule = global_model(job, epoch, attempt, scores, verdicts)
    if have is None:
        cid, dig = job.put_state(Kind.GLOBAL, global_state)
        have = job.commit_once(job.people.servers[0], Slot(epoch, Kind.GLOBAL, attempt=attempt), cid, dig)
    else:
        global_state = job.get_state(have, Kind.GLOBAL)
    if epoch + 1 < job.spec.rounds:
        _put_stage_inputs(job, epoch + 1, global_state)
    (val_acc, val_loss), (acc, loss) = global_scores(job, global_state)
    return {"chosen": chosen, "rule": rule, "global_model_cid": have.cid, "global_accuracy": acc,
            "global_loss": loss, "global_val_accuracy": val_acc, "global_val_loss": val_loss,
            "global_state": global_state}


# -- 10. reward ------------------------------------------------------------------------------
def work_done(job: Job, servers: list[str], holders: dict[tuple[int, int], list[str]]) -> dict[str, list[int]]:
    """The epochs of verified work of each participant address, read from the ledger's commitments.

    ``holders[(p, s)]`` are the trainers that held the slot in turn; each epoch's
    work belongs to the one that committed it. An evicted trainer has none.
    """
    n, epochs = job.spec.data_parallel, job.ledger.global_epochs
    done: dict[str, list[int]] = {a: [] for a in [*servers, *(a for hs in holders.values() for a in hs)]}
    for e in range(epochs):
        attempt = job.attempt(e)
        verdicts = job.get_doc(job.must(e, Kind.VERDICTS, attempt=attempt), Kind.VERDICTS)
        for p in range(n):
            score_c = job.commitment(e, Kind.SCORE, p, 0, attempt)
            validator = servers[validator_of(p, n)]
            if score_c is not None and score_c.writer == validator:
                done[validator].append(e)
            for s in range(job.n_stages):
                mine = [job.commitment(e, k, p, s, attempt) for k in (Kind.WEIGHTS, Kind.GRAD)]
                writer = mine[0].writer if mine[0] is not None else None
                committed = writer in holders[(p, s)] and all(c is not None and c.writer == writer for c in mine)
                if trainer_earns(verdicts, p, s, committed) and not job.ledger.evicted(writer):
                    done[writer].append(e)
    return done


def reward(job: Job) -> dict:
    """Credit verified work epoch by epoch, finish the ledger, settle, and let everyone claim its pay."""
    from tdml_core.chain.market import MAX_CREDIT_BATCH

    client, m, ledger, task_id = job.people.client, job.market, job.ledger, job.job_id
    servers = [s.address for s in job.people.servers]
    holders = {k: [t.address for t in job.people.holders(*k)] for k in job.people.trainers}
    if not ledger.finished and not ledger.closed:
        payer_of = {a: job.people.servers[p] for (p, _), hs in holders.items() for a in hs}
        for address, epochs in work_done(job, servers, holders).items():
            if ledger.evicted(address):
                continue
            owed = [e for e in epochs if not ledger.credited_for(address, e)]
            payer = payer_of.get(address, job.people.client)
            for i in range(0, len(owed), MAX_CREDIT_BATCH):
                ledger.credit(payer.account, address, owed[i:i + MAX_CREDIT_BATCH])
        ledger.finish(client.account)
    if not m.task(task_id)["settled"]:
        m.settle(client.account, task_id)
    everyone = [*job.people.everyone[1:], *(t for k in sorted(job.people.trainers) for t in job.people.holders(*k)[1:]
                                            if t not in job.people.standbys)]
    for who in everyone:  # each participant claims its own pay (and bond)
        if not m.claimed(task_id, who.address) and (ledger.earned(who.address) or m.bonded(task_id, who.address)):
            m.claim(who.account, task_id, who.address)
    rewards = {a: ledger.earned(a) for a in [*servers, *(a for hs in holders.values() for a in hs)]}
    budget = job.spec.protocol.budget_wei
    evicted = [f"{p}/{s}" for (p, s), hs in sorted(holders.items()) for a in hs if ledger.evicted(a)]
    return {"rewards": rewards, "refund_wei": refund(budget, ledger.credited, ledger.planned_units),
            "evicted": evicted}
