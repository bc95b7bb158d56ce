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

from tdml_core.artifacts import get_doc, get_state, put_doc, put_state
from tdml_core.chain import Chain
from tdml_core.chain.market import Commitment, LedgerClient, MarketClient
from tdml_core.config import GENERATE, JobSpec, parse_spec
from tdml_core.crypto import CryptoError
from tdml_core.identity import Identity, open_secrets

GAS_FUNDS_WEI = 5 * 10**17  # what a generated participant is given for gas on a development chain


class ProtocolError(RuntimeError):
    """The ledger or the store disagrees with what the protocol expects."""


class JobRef(BaseModel):
    out_dir: str
    chain: str = "embedded"
    store: str
    chain_id: int | None = None
    market: str | None = None
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


def epoch_slot(slot: str, attempt: int) -> str:
    """An epoch tried again after a crash writes its commitments under fresh slots: '0/1~1'."""
    return slot if attempt == 0 else f"{slot}~{attempt}"


@dataclass
class Participants:
    client: Identity
    servers: list[Identity]
    trainers: dict[tuple[int, int], Identity]
    key_files: dict[str, Path] = field(default_factory=dict)  # address -> key file
    passphrase: str | None = None

    def trainers_of(self, pipeline: int) -> list[Identity]:
        return [self.trainers[k] for k in sorted(self.trainers) if k[0] == pipeline]

    @property
    def everyone(self) -> list[Identity]:
        return [self.client, *self.servers, *(self.trainers[k] for k in sorted(self.trainers))]


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
    addresses = [i.address for i in [client, *servers, *trainers.values()]]
    if len(set(addresses)) != len(addresses):
        raise ProtocolError("every participant needs its own key; the same key file is listed twice")
    return Participants(client, servers, trainers, files, passphrase)


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
        self._secrets: dict | None = None
        self._test: tuple | None = None
        self._stage_keys: list[list[str]] | None = None
        self.plan = None  # the stage plan the servers made (steps.prepare)
        self.model = None  # the client's model with its seeded initial weights
        self.client_data = None  # the client's dataset, before it is sharded and sealed

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
    def commitment(self, epoch: int, kind: str, slot: str) -> Commitment | None:
        return self.ledger.commitment(epoch, kind, slot)

    def must(self, epoch: int, kind: str, slot: str) -> Commitment:
        c = self.ledger.commitment(epoch, kind, slot)
        if c is None:
            raise ProtocolError(f"nothing committed for epoch {epoch} {kind} {slot}")
        return c

    def commit_once(self, who: Identity, epoch: int, kind: str, slot: str, cid: str, digest: str) -> Commitment:
        """Commit unless the same digest is already there (a retried step); refuse a different one."""
        have = self.ledger.commitment(epoch, kind, slot)
        if have is not None:
            if have.digest.removeprefix("0x") != digest.removeprefix("0x"):
                raise ProtocolError(f"epoch {epoch} {kind} {slot} is already committed with another digest")
            return have
        self.ledger.commit(who.account, epoch, kind, slot, cid, digest)
        return Commitment(cid, digest, who.address)

    # -- secrets -----------------------------------------------------------------------
    def public_key(self, slot: str) -> bytes:
        """A participant's X25519 key, as it committed it (the digest field holds the 32 bytes)."""
        return bytes.fromhex(self.must(0, "pubkey", slot).digest.removeprefix("0x"))

    @property
    def secrets(self) -> dict[str, bytes]:
        """The data and model keys, opened from what the client sealed to server 0.

        Server 0 opens them with its key; an auditor holding only the client's key
        can open the same envelope from the other side of the exchange.
        """
        if self._secrets is None:
            env = bytes(self.store.get(self.must(0, "secrets", "server/0").cid))
            if self.people.servers:
                doc = open_secrets(self.people.servers[0], self.public_key("client"), self.job_id, "job-secrets", env)
            else:
                doc = open_secrets(self.people.client, self.public_key("server/0"), self.job_id, "job-secrets", env)
            self._secrets = {k: bytes.fromhex(v) for k, v in doc.items()}
        return self._secrets

    def set_secrets(self, secrets: dict[str, bytes]) -> None:
        self._secrets = dict(secrets)

    def put_state(self, role: str, state: dict, key: str = "model_key") -> tuple[str, str]:
        return put_state(self.store, self.secrets[key], self.job_id, role, state)

    def get_state(self, role: str, c: Commitment, key: str = "model_key") -> dict:
        return get_state(self.store, self.secrets[key], self.job_id, role, c.cid, c.digest)

    def put_doc(self, role: str, doc: dict, key: str = "model_key") -> tuple[str, str]:
        return put_doc(self.store, self.secrets[key], self.job_id, role, doc)

    def get_doc(self, role: str, c: Commitment, key: str = "model_key") -> dict:
        return get_doc(self.store, self.secrets[key], self.job_id, role, c.cid, c.digest)

    # -- what validators and aggregators need -----------------------------------------
    def test_set(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self._test is None:
            doc = self.get_state("test", self.must(0, "test", "set"), key="data_key")
            self._test = (doc["x"], doc["y"], int(doc["num_classes"]))
        return self._test

    def new_model(self) -> torch.nn.Module:
        from tdml_core.runtime.context import model_for

        x, _, num_classes = self.test_set()
        return model_for(self.spec, num_classes, x)

    def attempt(self, epoch: int) -> int:
        """The latest attempt at ``epoch`` that was started (-1 if none)."""
        a = -1
        while self.commitment(epoch, "attempt", str(a + 1)) is not None:
            a += 1
        return a


def spec_from_doc(doc: dict) -> JobSpec:
    return parse_spec(doc, "committed spec")


__all__ = ["CryptoError", "Job", "JobRef", "Participants", "ProtocolError", "epoch_slot", "load_participants"]
