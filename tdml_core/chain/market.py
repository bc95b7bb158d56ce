"""Typed calls on TDML's market and job-ledger contracts.

Every write names the participant that signs it; reads are plain calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_account.signers.local import LocalAccount

from tdml_core.chain.client import Chain, Sent

SERVER, TRAINER = 1, 2


def _digest32(digest: bytes | str) -> bytes:
    raw = bytes.fromhex(digest.removeprefix("0x")) if isinstance(digest, str) else digest
    if len(raw) != 32:
        raise ValueError("a commitment digest is 32 bytes (sha-256)")
    return raw


@dataclass
class Commitment:
    cid: str
    digest: str  # hex
    writer: str


class LedgerClient:
    def __init__(self, chain: Chain, address: str):
        self.chain, self.address = chain, address
        self.c = chain.contract("Ledger", address)

    def commit(self, writer: LocalAccount, epoch: int, kind: str, slot: str, cid: str, digest) -> Sent:
        return self.chain.transact(writer, self.c.functions.commit(epoch, kind, slot, cid, _digest32(digest)))

    def credit(self, by: LocalAccount, who: str, units: int) -> Sent:
        return self.chain.transact(by, self.c.functions.credit(who, units))

    def evict(self, by: LocalAccount, trainer: str, epoch: int, reason: str) -> Sent:
        return self.chain.transact(by, self.c.functions.evict(trainer, epoch, reason[:100]))

    def finish(self, client: LocalAccount) -> Sent:
        return self.chain.transact(client, self.c.functions.finish())

    def commitment(self, epoch: int, kind: str, slot: str) -> Commitment | None:
        key = self.c.functions.key(epoch, kind, slot).call()
        cid, digest, writer = self.c.functions.commitments(key).call()
        if int(writer, 16) == 0:
            return None
        return Commitment(cid, digest.hex(), writer)

    def earned(self, who: str) -> int:
        return self.c.functions.earned(who).call()

    def work(self, who: str) -> int:
        return self.c.functions.work(who).call()

    def evicted(self, who: str) -> bool:
        return self.c.functions.evicted(who).call()

    @property
    def finished(self) -> bool:
        return self.c.functions.finished().call()

    @property
    def global_epochs(self) -> int:
        return self.c.functions.global_epochs().call()


class MarketClient:
    def __init__(self, chain: Chain, address: str):
        self.chain, self.address = chain, address
        self.c = chain.contract("Market", address)

    @classmethod
    def deploy(cls, chain: Chain, deployer: LocalAccount) -> "MarketClient":
        blueprint, _ = chain.deploy(deployer, "Ledger", blueprint=True)
        market, _ = chain.deploy(deployer, "Market", blueprint)
        return cls(chain, market)

    def publish_task(self, client: LocalAccount, name: str, budget_wei: int, min_memory: int,
                     min_cpus: int, splits: int) -> tuple[int, Sent]:
        sent = self.chain.transact(
            client, self.c.functions.publishTask(name, min_memory, min_cpus, splits), value=budget_wei
        )
        (ev,) = self.chain.events(self.c, sent, "TaskPublished")
        return ev["task_id"], sent

    def register(self, server: LocalAccount, memory: int, cpus: int) -> Sent:
        return self.chain.transact(server, self.c.functions.register(memory, cpus))

    def hire_servers(self, client: LocalAccount, task_id: int, servers: list[str]) -> Sent:
        return self.chain.transact(client, self.c.functions.hireServers(task_id, servers))

    def post_trainer_hiring(self, server: LocalAccount, task_id: int, stages: int, min_memory: int) -> Sent:
        return self.chain.transact(server, self.c.functions.postTrainerHiring(task_id, stages, min_memory))

    def offer_trainer(self, trainer: LocalAccount, task_id: int, server: str, memory: int, cpus: int) -> Sent:
        return self.chain.transact(trainer, self.c.functions.offerTrainer(task_id, server, memory, cpus))

    def hire_trainers(self, server: LocalAccount, task_id: int, trainers: list[str]) -> Sent:
        return self.chain.transact(server, self.c.functions.hireTrainers(task_id, trainers))

    def open_ledger(self, client: LocalAccount, task_id: int, planned_units: int) -> tuple[LedgerClient, Sent]:
        sent = self.chain.transact(client, self.c.functions.openLedger(task_id, planned_units))
        (ev,) = self.chain.events(self.c, sent, "LedgerOpened")
        return LedgerClient(self.chain, ev["ledger"]), sent

    def settle(self, client: LocalAccount, task_id: int) -> Sent:
        return self.chain.transact(client, self.c.functions.settle(task_id))

    def withdraw(self, who: LocalAccount) -> Sent:
        return self.chain.transact(who, self.c.functions.withdraw())

    def participants(self, task_id: int) -> list[str]:
        return self.c.functions.participantsOf(task_id).call()

    def role(self, task_id: int, who: str) -> int:
        return self.c.functions.role(task_id, who).call()

    def task(self, task_id: int) -> dict:
        names = ["client", "name", "budget", "min_memory", "min_cpus", "splits", "ledger", "hired", "settled"]
        return dict(zip(names, self.c.functions.tasks(task_id).call()))

    def owed(self, who: str) -> int:
        return self.c.functions.owed(who).call()

    @property
    def escrowed(self) -> int:
        return self.c.functions.escrowed().call()
