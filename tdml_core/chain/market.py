"""Typed calls on TDML's market and job-ledger contracts.

Every write names the participant that signs it; reads are plain calls. A
ledger slot is (epoch, kind, pipeline, stage, attempt); the contract knows who
may write each one (``Kind`` lists them with their writer).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from eth_account.signers.local import LocalAccount

from tdml_core.chain.client import Chain, Sent

SERVER, TRAINER = 1, 2
MAX_PIPELINES = 4096  # the market's limits (contracts/Market.vy); a test checks they agree
MAX_STAGES = 64
MAX_ATTEMPTS = 8  # attempts at one epoch (contracts/Ledger.vy)
MAX_CREDIT_BATCH = 1024
MAX_HIRE_BATCH = 256


class Kind(IntEnum):
    """Kinds of commitment, as contracts/Ledger.vy numbers them, and who writes each."""

    SPEC = 1  # client
    CLIENT_KEYS = 2  # client: the job's root keys sealed to itself
    SERVER_KEYS = 3  # client: keys sealed to the server of a pipeline
    DATA_KEY = 4  # client: a pipeline's data key sealed to one of its trainers
    DATA = 5  # client: a pipeline's data shard
    EVAL = 6  # client: the set that scores local models
    INIT = 7  # client: the initial model
    PLAN = 8  # server of the pipeline
    TRAINER_KEYS = 9  # server of the pipeline: stage keys sealed to a trainer
    ATTEMPT = 10  # aggregator (server of pipeline 0)
    STAGE = 11  # aggregator: a stage's slice of the previous global model
    WEIGHTS = 12  # the trainer holding (pipeline, stage)
    GRAD = 13  # the trainer holding (pipeline, stage)
    SCORE = 14  # the validator of the pipeline (server of pipeline + 1)
    VERDICTS = 15  # aggregator
    GLOBAL = 16  # aggregator
    ROOT = 17  # the trainer holding (pipeline, stage): Merkle root of its per-step records (cid "leaves:N")
    CHECKS = 18  # the referee of the pipeline (its validator, server of pipeline + 1): its trainers' verification

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


def _digest32(digest: bytes | str) -> bytes:
    raw = bytes.fromhex(digest.removeprefix("0x")) if isinstance(digest, str) else digest
    if len(raw) != 32:
        raise ValueError("a commitment digest is 32 bytes (sha-256)")
    return raw


@dataclass(frozen=True)
class Commitment:
    cid: str
    digest: str  # hex
    writer: str


@dataclass(frozen=True)
class Slot:
    epoch: int
    kind: Kind
    pipeline: int = 0
    stage: int = 0
    attempt: int = 0

    def __str__(self) -> str:
        where = f"{self.pipeline}/{self.stage}"
        return f"epoch {self.epoch} {self.kind.label} {where}" + (f" attempt {self.attempt}" if self.attempt else "")

    @property
    def args(self) -> tuple[int, int, int, int, int]:
        return self.epoch, int(self.kind), self.pipeline, self.stage, self.attempt


class LedgerClient:
    def __init__(self, chain: Chain, address: str):
        self.chain, self.address = chain, address
        self.c = chain.contract("Ledger", address)
        self._committed: dict[tuple, Commitment] = {}  # a slot is written once ("already committed"), so kept

    def commit(self, writer: LocalAccount, slot: Slot, cid: str, digest) -> Sent:
        return self.chain.transact(writer, self.c.functions.commit(*slot.args, cid, _digest32(digest)))

    def commit_work(self, trainer: LocalAccount, epoch: int, pipeline: int, stage: int, attempt: int,
                    weights: tuple[str, bytes | str], grad: tuple[str, bytes | str], root_cid: str,
                    root: bytes | str) -> Sent:
        """The trainer's WEIGHTS, GRAD and ROOT slots of (epoch, pipeline, stage, attempt) in one transaction."""
        (w_cid, w_digest), (g_cid, g_digest) = weights, grad
        call = self.c.functions.commitWork(epoch, pipeline, stage, attempt, w_cid, _digest32(w_digest), g_cid,
                                           _digest32(g_digest), root_cid, _digest32(root))
        return self.chain.transact(trainer, call)

    def credit(self, by: LocalAccount, who: str, epochs: list[int]) -> Sent:
        return self.chain.transact(by, self.c.functions.credit(who, list(epochs)))

    def evict(self, by: LocalAccount, trainer: str, epoch: int, reason: str) -> Sent:
        return self.chain.transact(by, self.c.functions.evict(trainer, epoch, reason.encode()[:100].decode(errors="ignore")))

    def convict(self, by: LocalAccount, trainer: str, epoch: int, reason: str, proof) -> Sent:
        """Evict ``trainer`` with a fraud proof (32 bytes, hex or raw): it also forfeits its bond to the client."""
        reason = reason.encode()[:100].decode(errors="ignore")
        return self.chain.transact(by, self.c.functions.convict(trainer, epoch, reason, _digest32(proof)))

    def finish(self, client: LocalAccount) -> Sent:
        return self.chain.transact(client, self.c.functions.finish())

    def commitment(self, slot: Slot) -> Commitment | None:
        """What the slot holds (None: nothing yet). The contract refuses a second write to a slot, so a
        commitment once read is kept and never asked for again; an empty slot is asked every time."""
        have = self._committed.get(slot.args)
        if have is not None:
            return have
        key = self.c.functions.key(*slot.args).call()
        cid, digest, writer = self.c.functions.commitments(key).call()
        if int(writer, 16) == 0:
            return None
        self._committed[slot.args] = have = Commitment(cid, digest.hex(), writer)
        return have

    def owner(self, slot: Slot) -> str:
        return self.c.functions.owner(*slot.args).call()

    def earned(self, who: str) -> int:
        return self.c.functions.earned(who).call()

    def work(self, who: str) -> int:
        return self.c.functions.work(who).call()

    def credited_for(self, who: str, epoch: int) -> bool:
        return self.c.functions.credited_for(who, epoch).call()

    def evicted(self, who: str) -> bool:
        return self.c.functions.evicted(who).call()

    def forfeited(self, who: str) -> bool:
        return self.c.functions.forfeited(who).call()

    def proof_of(self, who: str) -> str:
        """The proof ``who`` was convicted with, as hex (64 zeros when it was not)."""
        return bytes(self.c.functions.proof_of(who).call()).hex()

    def last_work_block(self, epoch: int, attempt: int) -> int:
        """The block of the last WEIGHTS, GRAD or ROOT write of (epoch, attempt); 0 before any."""
        return self.c.functions.last_work_block(epoch, attempt).call()

    def attempts(self, epoch: int) -> int:
        return self.c.functions.attempts(epoch).call()

    def _get(self, name: str):
        return getattr(self.c.functions, name)().call()

    finished = property(lambda self: self._get("finished"))
    closed = property(lambda self: self._get("closed"))
    global_epochs = property(lambda self: self._get("global_epochs"))
    credited = property(lambda self: self._get("credited"))
    planned_units = property(lambda self: self._get("planned_units"))
    budget = property(lambda self: self._get("budget"))
    client = property(lambda self: self._get("client"))
    market = property(lambda self: self._get("market"))
    task_id = property(lambda self: self._get("task_id"))


TASK_FIELDS = ["client", "name", "budget", "bond", "min_memory", "min_cpus", "splits", "stages", "epochs",
               "deadline", "ledger", "ledger_block", "servers", "filled", "settled"]


class MarketClient:
    def __init__(self, chain: Chain, address: str):
        self.chain, self.address = chain, address
        self.c = chain.contract("Market", address)

    @classmethod
    def deploy(cls, chain: Chain, deployer: LocalAccount) -> "MarketClient":
        blueprint, _ = chain.deploy(deployer, "Ledger", blueprint=True)
        market, _ = chain.deploy(deployer, "Market", blueprint)
        return cls(chain, market)

    # -- the client --------------------------------------------------------------------
    def publish_task(self, client: LocalAccount, salt: bytes, name: str, budget_wei: int, *, splits: int,
                     stages: int, epochs: int, deadline: int, pubkey: bytes, min_memory: int = 1,
                     min_cpus: int = 1, bond_wei: int = 0) -> tuple[int, Sent]:
        call = self.c.functions.publishTask(salt, name, min_memory, min_cpus, splits, stages, epochs, deadline,
                                            bond_wei, pubkey)
        sent = self.chain.transact(client, call, value=budget_wei)
        (ev,) = self.chain.events(self.c, sent, "TaskPublished")
        return ev["task_id"], sent

    def find_task(self, client: str, salt: bytes) -> int | None:
        """The task ``client`` published under ``salt``, if it did."""
        n = self.c.functions.task_of(client, salt).call()
        return None if n == 0 else n - 1

    def hire_servers(self, client: LocalAccount, task_id: int, servers: list[str]) -> Sent:
        return self.chain.transact(client, self.c.functions.hireServers(task_id, servers))

    def open_ledger(self, client: LocalAccount, task_id: int) -> tuple[LedgerClient, Sent]:
        sent = self.chain.transact(client, self.c.functions.openLedger(task_id))
        (ev,) = self.chain.events(self.c, sent, "LedgerOpened")
        return LedgerClient(self.chain, ev["ledger"]), sent

    def ledger_of(self, task_id: int) -> LedgerClient | None:
        address = self.task(task_id)["ledger"]
        return None if int(address, 16) == 0 else LedgerClient(self.chain, address)

    def settle(self, who: LocalAccount, task_id: int) -> Sent:
        return self.chain.transact(who, self.c.functions.settle(task_id))

    # -- servers and trainers ------------------------------------------------------------
    def register(self, server: LocalAccount, task_id: int, memory: int, cpus: int, pubkey: bytes,
                 bond_wei: int = 0) -> Sent:
        return self.chain.transact(server, self.c.functions.register(task_id, memory, cpus, pubkey), value=bond_wei)

    def post_trainer_hiring(self, server: LocalAccount, task_id: int, stages: int, min_memory: int) -> Sent:
        return self.chain.transact(server, self.c.functions.postTrainerHiring(task_id, stages, min_memory))

    def offer_trainer(self, trainer: LocalAccount, task_id: int, server: str, memory: int, cpus: int,
                      pubkey: bytes, bond_wei: int = 0) -> Sent:
        call = self.c.functions.offerTrainer(task_id, server, memory, cpus, pubkey)
        return self.chain.transact(trainer, call, value=bond_wei)

    def hire_trainers(self, server: LocalAccount, task_id: int, trainers: list[str], stages: list[int]) -> Sent:
        return self.chain.transact(server, self.c.functions.hireTrainers(task_id, trainers, stages))

    def replace_trainer(self, server: LocalAccount, task_id: int, old: str, new: str) -> Sent:
        return self.chain.transact(server, self.c.functions.replaceTrainer(task_id, old, new))

    def withdraw_offer(self, who: LocalAccount, task_id: int) -> Sent:
        return self.chain.transact(who, self.c.functions.withdrawOffer(task_id))

    def claim(self, by: LocalAccount, task_id: int, who: str) -> Sent:
        return self.chain.transact(by, self.c.functions.claim(task_id, who))

    def withdraw(self, who: LocalAccount) -> Sent:
        return self.chain.transact(who, self.c.functions.withdraw())

    # -- reads ---------------------------------------------------------------------------
    def task(self, task_id: int) -> dict:
        return dict(zip(TASK_FIELDS, self.c.functions.tasks(task_id).call()))

    def role(self, task_id: int, who: str) -> int:
        return self.c.functions.role(task_id, who).call()

    def server_of(self, task_id: int, who: str) -> str:
        return self.c.functions.server_of(task_id, who).call()

    def server_at(self, task_id: int, pipeline: int) -> str:
        return self.c.functions.server_at(task_id, pipeline).call()

    def pipeline_of(self, task_id: int, who: str) -> int:
        return self.c.functions.pipeline_of(task_id, who).call()

    def stage_of(self, task_id: int, who: str) -> int:
        return self.c.functions.stage_of(task_id, who).call()

    def holder(self, task_id: int, pipeline: int, stage: int) -> str:
        return self.c.functions.holder(task_id, pipeline, stage).call()

    def pubkey(self, task_id: int, who: str) -> bytes:
        return bytes(self.c.functions.pubkey(task_id, who).call())

    def registered(self, task_id: int, who: str) -> bool:
        return self.c.functions.servers(task_id, who).call()[1] > 0

    def offered(self, task_id: int, who: str) -> bool:
        return self.c.functions.offers(task_id, who).call()[1] > 0

    def offer_server(self, task_id: int, who: str) -> str:
        """The server a trainer offered to (the zero address when it made no offer)."""
        return self.c.functions.offers(task_id, who).call()[0]

    def hiring_open(self, task_id: int, server: str) -> bool:
        return self.c.functions.hiring_open(task_id, server).call()

    def claimed(self, task_id: int, who: str) -> bool:
        return self.c.functions.claimed(task_id, who).call()

    def bonded(self, task_id: int, who: str) -> int:
        return self.c.functions.bonded(task_id, who).call()

    def owed(self, who: str) -> int:
        return self.c.functions.owed(who).call()

    @property
    def escrowed(self) -> int:
        return self.c.functions.escrowed().call()
