"""One job of the protocol as its participants see it: keys, chain, store, ledger, secrets.

A job lives in a run folder:

    DIR/job.json      job id, chain URL and id, market and ledger addresses, store URL
    DIR/chain.jsonl   every transaction of the embedded chain, to re-open it (resume, audit)
    DIR/keys/         generated participants' key files (local runs)
    DIR/store/        the default local content store

``JobRef`` is the serialisable handle (what a dispatched pipeline epoch gets);
``Job`` is the opened thing. All participants of a local run live in one
process, each signing with its own key.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel

from tdml_core.artifacts import OpenedStates, get_doc, get_state, put_doc, put_state
from tdml_core.chain import Chain
from tdml_core.chain.market import Commitment, Kind, LedgerClient, MarketClient, Slot
from tdml_core.config import GENERATE, JobSpec, parse_spec
from tdml_core.crypto import CryptoError
from tdml_core.identity import Identity, open_secrets
from tdml_core.protocol.keys import JobKeys, role_of

GAS_FUNDS_WEI = 5 * 10**17  # what a generated participant is given for gas on a development chain


class ProtocolError(RuntimeError):
    """The ledger or the store disagrees with what the protocol expects."""


class JobRef(BaseModel):
    out_dir: str
    chain: str = "embedded"
    store: str
    chain_id: int | None = None
    market: str | None = None
    deploy_nonce: int | None = None  # the client's nonce when it deployed the market (found again after a crash)
    salt: str | None = None  # hex; the task is published under it, so a crashed client finds its task again
    job_id: int | None = None
    ledger: str | None = None
    ledger_block: int | None = None  # where the ledger's events start

    def save(self) -> None:
        path = Path(self.out_dir) / "job.json"
        tmp = path.with_name(f".job.{os.getpid()}.{threading.get_ident()}.tmp")  # writers may run side by side
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, out_dir: str | Path) -> "JobRef":
        """The job in ``out_dir``, wherever that folder has been moved or copied to."""
        path = Path(out_dir) / "job.json"
        if not path.is_file():
            raise ProtocolError(f"{out_dir}: no job here (job.json is missing)")
        try:
            ref = cls.model_validate_json(path.read_text())
        except ValueError:
            raise ProtocolError(f"{path}: not a TDML job file") from None
        ref.out_dir = str(Path(out_dir).resolve())
        return ref

    @property
    def store_url(self) -> str:
        """The store's URL; a local store named relative to the run folder (the default) made absolute."""
        if self.store.startswith("local:") and not Path(self.store[6:]).is_absolute():
            return f"local:{Path(self.out_dir) / self.store[6:]}"
        return self.store


@dataclass
class Participants:
    client: Identity
    servers: list[Identity]
    trainers: dict[tuple[int, int], Identity]
    key_files: dict[str, Path] = field(default_factory=dict)  # address -> key file
    passphrase: str | None = None
    standbys: list[Identity] = field(default_factory=list)  # offer at the start; replace evicted trainers
    hired: dict[tuple[int, int], list[Identity]] = field(default_factory=dict)  # every holder of a slot, in turn

    def trainers_of(self, pipeline: int) -> list[Identity]:
        return [self.trainers[k] for k in sorted(self.trainers) if k[0] == pipeline]

    def holders(self, pipeline: int, stage: int) -> list[Identity]:
        """Who held (pipeline, stage), first to current (its original trainer, then replacements)."""
        return self.hired.get((pipeline, stage)) or [self.trainers[(pipeline, stage)]]

    def replace(self, pipeline: int, stage: int, new: Identity) -> None:
        self.hired[(pipeline, stage)] = [*self.holders(pipeline, stage), new]
        self.trainers[(pipeline, stage)] = new

    @property
    def everyone(self) -> list[Identity]:
        """The client, the servers, the trainers first hired, the standbys."""
        first = [self.holders(*k)[0] for k in sorted(self.trainers)]
        return [self.client, *self.servers, *first, *self.standbys]


def _identity(entry: str, name: str, keys_dir: Path, passphrase: str | None, files: dict) -> Identity:
    if entry == GENERATE:
        path = keys_dir / f"{name}.json"
        if path.exists():  # a resumed run keeps its participants
            ident = Identity.load(path)
        else:
            ident = Identity.generate(name)
            ident.save(path)
    else:
        path = Path(entry).expanduser()
        ident = Identity.load(path, passphrase)
    files[ident.address] = path.resolve()
    return ident


def load_participants(spec: JobSpec, n_stages: int, keys_dir: Path) -> Participants:
    parts = spec.protocol.participants
    passphrase = os.environ.get(parts.passphrase_env) if parts.passphrase_env else None
    files: dict[str, Path] = {}
    client = _identity(parts.client, "client", keys_dir, passphrase, files)
    servers = [
        _identity(GENERATE if parts.servers == GENERATE else parts.servers[p], f"server-{p}", keys_dir, passphrase, files)
        for p in range(spec.data_parallel)
    ]
    trainers = {}
    for p in range(spec.data_parallel):
        for s in range(n_stages):
            entry = GENERATE if parts.trainers == GENERATE else parts.trainers[p * n_stages + s]
            trainers[(p, s)] = _identity(entry, f"trainer-{p}-{s}", keys_dir, passphrase, files)
    standbys = [_identity(GENERATE, f"standby-{i}", keys_dir, passphrase, files)
                for i in range(spec.protocol.standby_trainers)]
    addresses = [i.address for i in [client, *servers, *trainers.values(), *standbys]]
    if len(set(addresses)) != len(addresses):
        raise ProtocolError("every participant needs its own key; the same key file is listed twice")
    return Participants(client, servers, trainers, files, passphrase, standbys)


_OPEN_CHAINS: dict[str, Chain] = {}
_OPEN_JOBS: dict[str, "Job"] = {}
_LOCK = threading.Lock()


def open_chain(ref: JobRef) -> Chain:
    """The job's chain; an embedded one is shared by everyone in this process and journaled in DIR."""
    key = f"{ref.chain}|{Path(ref.out_dir).resolve()}"
    with _LOCK:
        if key not in _OPEN_CHAINS:
            journal = Path(ref.out_dir) / "chain.jsonl" if ref.chain == "embedded" else None
            _OPEN_CHAINS[key] = Chain(ref.chain, journal=journal)
        return _OPEN_CHAINS[key]


def forget_chain(ref: JobRef) -> None:
    with _LOCK:
        _OPEN_CHAINS.pop(f"{ref.chain}|{Path(ref.out_dir).resolve()}", None)


def remember_job(job: "Job") -> None:
    """Make an opened job findable by its folder (the pipeline epochs of a local run use it)."""
    with _LOCK:
        _OPEN_JOBS[str(Path(job.ref.out_dir).resolve())] = job


def opened_job(out_dir: str | Path) -> "Job | None":
    with _LOCK:
        return _OPEN_JOBS.get(str(Path(out_dir).resolve()))


def forget_job(out_dir: str | Path) -> None:
    with _LOCK:
        job = _OPEN_JOBS.pop(str(Path(out_dir).resolve()), None)
    if job is not None:
        forget_chain(job.ref)


class Job:
    """An opened job: the spec, everyone's keys, the chain, the store, and the job's secrets."""

    def __init__(self, ref: JobRef, spec: JobSpec | None, participants: Participants | None, n_stages: int = 0):
        from tdml_core.storage import open_store

        self.ref, self.spec, self.people = ref, spec, participants
        self.n_stages = n_stages
        self.chain = open_chain(ref)
        self.store = open_store(ref.store_url)
        self.market = MarketClient(self.chain, ref.market) if ref.market else None
        self.ledger = LedgerClient(self.chain, ref.ledger) if ref.ledger else None
        self._keys: JobKeys | None = None
        self._eval: tuple | None = None
        self._stage_keys: list[list[str]] | None = None
        self.plan = None  # the stage plan the servers made (steps.prepare)
        self.model = None  # the client's model with its seeded initial weights
        self.client_data = None  # the client's dataset, before it is sharded and sealed
        self.restarted: dict[int, list[str]] = {}  # pipeline -> slots whose processes were started again
        self.failures: dict[int, list[str]] = {}  # pipeline -> what stopped its trainers' processes
        self.opened = OpenedStates()  # states opened (or put) in this process, for their next reader

    # -- identity of the job ----------------------------------------------------
    @property
    def job_id(self) -> int:
        if self.ref.job_id is None:
            raise ProtocolError("the task is not published yet")
        return self.ref.job_id

    @property
    def out(self) -> Path:
        return Path(self.ref.out_dir)

    def save_ref(self) -> None:
        self.ref.save()

    # -- ledger helpers ------------------------------------------------------------
    def commitment(self, epoch: int, kind: Kind, pipeline: int = 0, stage: int = 0,
                   attempt: int = 0) -> Commitment | None:
        return self.ledger.commitment(Slot(epoch, kind, pipeline, stage, attempt))

    def must(self, epoch: int, kind: Kind, pipeline: int = 0, stage: int = 0, attempt: int = 0) -> Commitment:
        slot = Slot(epoch, kind, pipeline, stage, attempt)
        c = self.ledger.commitment(slot)
        if c is None:
            raise ProtocolError(f"nothing committed for {slot}")
        return c

    def commit_once(self, who: Identity, slot: Slot, cid: str, digest: str) -> Commitment:
        """Commit unless the same digest is already there (a retried step); refuse a different one."""
        have = self.ledger.commitment(slot)
        if have is not None:
            if have.digest.removeprefix("0x") != digest.removeprefix("0x"):
                raise ProtocolError(f"{slot} is already committed with another digest")
            return have
        self.ledger.commit(who.account, slot, cid, digest)
        return Commitment(cid, digest, who.address)

    def attempt(self, epoch: int) -> int:
        """The latest attempt at ``epoch`` that was started (-1 if none)."""
        return self.ledger.attempts(epoch) - 1

    # -- keys -----------------------------------------------------------------------
    def public_key(self, address: str) -> bytes:
        """A participant's X25519 key, as it published it on the market."""
        key = self.market.pubkey(self.job_id, address)
        if key == bytes(32):
            raise ProtocolError(f"{address} published no key for job {self.job_id}")
        return key

    @property
    def keys(self) -> JobKeys:
        """The job's keys as the client holds them: opened from what it sealed to itself."""
        if self._keys is None:
            client = self.people.client
            env = bytes(self.store.get(self.must(0, Kind.CLIENT_KEYS).cid))
            doc = open_secrets(client, client.public_key, self.job_id, "client-keys", env)
            self._keys = JobKeys.from_doc(doc)
        return self._keys

    def set_keys(self, keys: JobKeys) -> None:
        self._keys = keys

    def put_state(self, kind: Kind, state: dict, pipeline: int = 0, stage: int = 0) -> tuple[str, str]:
        key, role = self.keys.for_kind(kind, pipeline, stage), role_of(kind, pipeline, stage)
        cid, dig = put_state(self.store, key, self.job_id, role, state)
        self.opened.put((cid, dig, role, key), state, copy=True)
        return cid, dig

    def get_state(self, c: Commitment, kind: Kind, pipeline: int = 0, stage: int = 0) -> dict:
        """A committed state: fetched, opened and checked against its digest once in this process."""
        key, role = self.keys.for_kind(kind, pipeline, stage), role_of(kind, pipeline, stage)
        dig = c.digest.removeprefix("0x")
        state = self.opened.get((c.cid, dig, role, key))
        if state is None:
            state = get_state(self.store, key, self.job_id, role, c.cid, dig)
            self.opened.put((c.cid, dig, role, key), state)  # keeps a dict of its own
        return state

    def put_doc(self, kind: Kind, doc: dict, pipeline: int = 0, stage: int = 0) -> tuple[str, str]:
        return put_doc(self.store, self.keys.for_kind(kind, pipeline, stage), self.job_id,
                       role_of(kind, pipeline, stage), doc)

    def get_doc(self, c: Commitment, kind: Kind, pipeline: int = 0, stage: int = 0) -> dict:
        return get_doc(self.store, self.keys.for_kind(kind, pipeline, stage), self.job_id,
                       role_of(kind, pipeline, stage), c.cid, c.digest)

    # -- what validators and aggregators need -----------------------------------------
    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The validation set local models are scored on (servers and the client hold its key, trainers do not)."""
        if self._eval is None:
            doc = self.get_state(self.must(0, Kind.EVAL), Kind.EVAL)
            self._eval = (doc["x"], doc["y"], int(doc["num_classes"]))
        return self._eval

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The client's own test set: never sealed, never scored by a server; every reported accuracy is on it.

        The audit derives it from the committed spec, as the client did (``DatasetError`` if that data is not here).
        """
        if self.client_data is None:
            from tdml_core.data import load_dataset

            self.client_data = load_dataset(self.spec.dataset, self.spec.seed)
        return self.client_data.test_x, self.client_data.test_y

    def new_model(self) -> torch.nn.Module:
        from tdml_core.runtime.context import model_for

        x, _, num_classes = self.eval_set()
        return model_for(self.spec, num_classes, x)

    # who holds which slot, as the market recorded it
    def server_address(self, pipeline: int) -> str:
        return self.market.server_at(self.job_id, pipeline)

    def trainer_address(self, pipeline: int, stage: int) -> str:
        return self.market.holder(self.job_id, pipeline, stage)

    def sync_holders(self) -> None:
        """Learn from the market who holds each slot now (a resumed run after replacements)."""
        from tdml_core.chain.market import TRAINER

        m, task = self.market, self.job_id
        for (p, s), first in sorted(self.people.trainers.items()):
            first = self.people.holders(p, s)[0]
            held = [first] + [sb for sb in self.people.standbys if m.role(task, sb.address) == TRAINER
                              and m.pipeline_of(task, sb.address) == p and m.stage_of(task, sb.address) == s]
            current = m.holder(task, p, s)
            held.sort(key=lambda i: i.address != first.address)  # the first stays first
            now = next((i for i in held if i.address == current), None)
            if now is None:
                continue  # not hired yet
            self.people.hired[(p, s)] = [i for i in held if i.address != current] + [now]
            self.people.trainers[(p, s)] = now

    def generation(self, pipeline: int, stage: int) -> int:
        """How many trainers held (pipeline, stage) before its current one: its keys' slot number."""
        return len(self.people.holders(pipeline, stage)) - 1


def spec_from_doc(doc: dict) -> JobSpec:
    return parse_spec(doc, "committed spec")


__all__ = ["CryptoError", "Job", "JobRef", "Kind", "Participants", "ProtocolError", "Slot", "load_participants"]
