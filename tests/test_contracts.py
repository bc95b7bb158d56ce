"""The market and ledger contracts: every rule, every way to abuse it, on both backends."""

from pathlib import Path

import pytest
from eth_account import Account
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdml_core.chain import SERVER, TRAINER, Chain, ChainError, MarketClient
from tdml_core.chain.compile import compile_contract

ETH = 10**18
BUDGET = 3 * ETH
DIGEST = bytes(range(32))


def funded(chain: Chain, n: int) -> list:
    accounts = [Account.create() for _ in range(n)]
    for a in accounts:
        chain.fund(a.address, 10 * ETH)
    return accounts


class Job:
    """A published task with 2 servers hired, each with 1 trainer, and its ledger open."""

    def __init__(self, chain: Chain, planned_units: int = 10):
        self.chain = chain
        self.client, self.ps0, self.ps1, self.t0, self.t1, self.outsider = funded(chain, 6)
        self.market = MarketClient.deploy(chain, self.client)
        self.task_id, _ = self.market.publish_task(self.client, "digits", BUDGET, 10**9, 2, 2)
        for ps in (self.ps0, self.ps1):
            self.market.register(ps, 2 * 10**9, 4)
        self.market.hire_servers(self.client, self.task_id, [self.ps0.address, self.ps1.address])
        for ps, t in ((self.ps0, self.t0), (self.ps1, self.t1)):
            self.market.post_trainer_hiring(ps, self.task_id, 1, 10**9)
            self.market.offer_trainer(t, self.task_id, ps.address, 2 * 10**9, 2)
            self.market.hire_trainers(ps, self.task_id, [t.address])
        self.ledger, _ = self.market.open_ledger(self.client, self.task_id, planned_units)


def test_publish_escrows_the_budget_and_hiring_is_recorded(chain):
    job = Job(chain)
    assert chain.balance(job.market.address) == BUDGET == job.market.escrowed
    task = job.market.task(job.task_id)
    assert task["client"] == job.client.address and task["budget"] == BUDGET and task["splits"] == 2
    assert job.market.role(job.task_id, job.ps0.address) == SERVER
    assert job.market.role(job.task_id, job.t1.address) == TRAINER
    assert job.market.participants(job.task_id) == [a.address for a in (job.ps0, job.ps1, job.t0, job.t1)]


def test_hiring_rules(chain):
    client, ps, weak, other, trainer = funded(chain, 5)
    market = MarketClient.deploy(chain, client)
    task, _ = market.publish_task(client, "t", ETH, 10**9, 2, 1)
    market.register(ps, 2 * 10**9, 4)
    market.register(weak, 10**6, 1)
    with pytest.raises(ChainError, match="only the client"):
        market.hire_servers(other, task, [ps.address])
    with pytest.raises(ChainError, match="below baseline"):
        market.hire_servers(client, task, [weak.address])
    with pytest.raises(ChainError, match="not registered"):
        market.hire_servers(client, task, [other.address])
    with pytest.raises(ChainError, match="one server per split"):
        market.hire_servers(client, task, [ps.address, ps.address])
    market.hire_servers(client, task, [ps.address])
    with pytest.raises(ChainError, match="already hired"):
        market.hire_servers(client, task, [ps.address])
    with pytest.raises(ChainError, match="server is not hiring"):
        market.offer_trainer(trainer, task, ps.address, 10**9, 2)
    with pytest.raises(ChainError, match="only a hired server"):
        market.post_trainer_hiring(other, task, 1, 0)
    market.post_trainer_hiring(ps, task, 1, 0)
    with pytest.raises(ChainError, match="no offer from trainer"):
        market.hire_trainers(ps, task, [other.address])
    with pytest.raises(ChainError, match="no budget"):
        market.publish_task(client, "free", 0, 1, 1, 1)


def test_only_hired_participants_write_the_ledger(chain):
    job = Job(chain)
    sent = job.ledger.commit(job.t0, 0, "grad", "0/0", "bafkreiexample", DIGEST)
    (ev,) = chain.events(job.ledger.c, sent, "Committed")
    assert ev["writer"] == job.t0.address and ev["digest"] == DIGEST
    got = job.ledger.commitment(0, "grad", "0/0")
    assert got.cid == "bafkreiexample" and got.digest == DIGEST.hex() and got.writer == job.t0.address
    with pytest.raises(ChainError, match="not hired"):
        job.ledger.commit(job.outsider, 0, "grad", "9/9", "x", DIGEST)
    with pytest.raises(ChainError, match="already committed"):
        job.ledger.commit(job.ps0, 0, "grad", "0/0", "other", DIGEST)
    job.ledger.commit(job.ps0, 0, "global", "-", "bafyglobal", DIGEST)
    assert job.ledger.global_epochs == 1


def test_credit_and_eviction_rules(chain):
    job = Job(chain, planned_units=4)
    with pytest.raises(ChainError, match="only its server credits a trainer"):
        job.ledger.credit(job.ps1, job.t0.address, 1)
    with pytest.raises(ChainError, match="only the client credits a server"):
        job.ledger.credit(job.ps0, job.ps0.address, 1)
    with pytest.raises(ChainError, match="not a participant"):
        job.ledger.credit(job.client, job.outsider.address, 1)
    job.ledger.credit(job.ps0, job.t0.address, 2)
    with pytest.raises(ChainError, match="more work than planned"):
        job.ledger.credit(job.client, job.ps0.address, 3)  # would overpay the budget
    with pytest.raises(ChainError, match="only its server or the client"):
        job.ledger.evict(job.ps1, job.t0.address, 0, "x")
    job.ledger.evict(job.ps0, job.t0.address, 0, "gradient outlier")
    assert job.ledger.evicted(job.t0.address) and job.ledger.earned(job.t0.address) == 0
    with pytest.raises(ChainError, match="evicted"):
        job.ledger.commit(job.t0, 1, "grad", "0/0", "x", DIGEST)
    with pytest.raises(ChainError, match="evicted"):
        job.ledger.credit(job.ps0, job.t0.address, 1)


def test_settlement_pays_verified_work_refunds_the_rest_once(chain):
    job = Job(chain, planned_units=6)
    for who, by in ((job.ps0, job.client), (job.ps1, job.client), (job.t0, job.ps0), (job.t1, job.ps1)):
        job.ledger.credit(by, who.address, 1)
    job.ledger.credit(job.ps0, job.t0.address, 1)
    job.ledger.evict(job.ps1, job.t1.address, 0, "score outlier")
    with pytest.raises(ChainError, match="job not finished"):
        job.market.settle(job.client, job.task_id)
    with pytest.raises(ChainError, match="only the client"):
        job.ledger.finish(job.ps0)
    job.ledger.finish(job.client)
    with pytest.raises(ChainError, match="only the client"):
        job.market.settle(job.ps0, job.task_id)
    before = {a.address: chain.balance(a.address) for a in (job.ps0, job.ps1, job.t0, job.t1)}
    client_before = chain.balance(job.client.address)
    sent = job.market.settle(job.client, job.task_id)
    unit = BUDGET // 6
    expected = {job.ps0.address: unit, job.ps1.address: unit, job.t0.address: 2 * unit, job.t1.address: 0}
    for who, amount in expected.items():
        assert chain.balance(who) - before[who] == amount
    fee = sent.gas_used * sent.receipt["effectiveGasPrice"]
    refund = BUDGET - 4 * unit
    assert chain.balance(job.client.address) - client_before == refund - fee
    assert chain.balance(job.market.address) == 0 == job.market.escrowed
    with pytest.raises(ChainError, match="already settled"):
        job.market.settle(job.client, job.task_id)
    with pytest.raises(ChainError, match="job finished"):
        job.ledger.credit(job.client, job.ps0.address, 1)


def test_reentrant_trainer_cannot_take_more_than_its_due(chain):
    job = Job(chain, planned_units=4)
    art = compile_contract("Attacker", Path(__file__).parent / "contracts")
    address, _ = chain.deploy(job.outsider, art, job.market.address, job.task_id)
    attacker = chain.contract(art, address)
    job.market.post_trainer_hiring(job.ps0, job.task_id, 2, 0)
    chain.transact(job.outsider, attacker.functions.offer(job.ps0.address))
    job.market.hire_trainers(job.ps0, job.task_id, [address])
    job.ledger.credit(job.ps0, address, 2)
    job.ledger.finish(job.client)
    chain.transact(job.outsider, attacker.functions.arm(1))  # re-enter settle when paid
    job.market.settle(job.client, job.task_id)
    due = BUDGET * 2 // 4
    assert chain.balance(address) == 0 and job.market.owed(address) == due
    assert chain.balance(job.market.address) == due == job.market.escrowed
    chain.transact(job.outsider, attacker.functions.arm(2))  # re-enter withdraw when paid
    with pytest.raises(ChainError):
        chain.transact(job.outsider, attacker.functions.pull())
    chain.transact(job.outsider, attacker.functions.arm(0))
    chain.transact(job.outsider, attacker.functions.pull())
    assert chain.balance(address) == due and job.market.owed(address) == 0
    assert chain.balance(job.market.address) == 0 == job.market.escrowed
    with pytest.raises(ChainError, match="nothing owed"):
        chain.transact(job.outsider, attacker.functions.pull())


def test_a_relay_submits_what_a_participant_signed(chain):
    job = Job(chain)
    raw = chain.sign(job.t0, {"to": job.ledger.address,
                              "data": job.ledger.c.encode_abi("commit", [3, "grad", "0/0", "bafyrelayed", DIGEST])})
    relay = Chain.__new__(Chain)
    relay.__dict__.update(chain.__dict__)  # another submitter on the same node, holding no keys
    relay._nonces = {}
    relay.submit_signed(raw)
    assert job.ledger.commitment(3, "grad", "0/0").writer == job.t0.address


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    credits=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3)), min_size=0, max_size=6),
    evict=st.sets(st.sampled_from(["t0", "t1"])),
    budget=st.integers(1, 10**20),
)
def test_escrow_balance_property(credits, evict, budget):
    chain = Chain("embedded")
    client, ps0, ps1, t0, t1 = funded(chain, 5)
    chain.fund(client.address, budget)
    market = MarketClient.deploy(chain, client)
    task, _ = market.publish_task(client, "p", budget, 1, 1, 2)
    for ps in (ps0, ps1):
        market.register(ps, 1, 1)
    market.hire_servers(client, task, [ps0.address, ps1.address])
    for ps, t in ((ps0, t0), (ps1, t1)):
        market.post_trainer_hiring(ps, task, 1, 0)
        market.offer_trainer(t, task, ps.address, 1, 1)
        market.hire_trainers(ps, task, [t.address])
    planned = 12
    ledger, _ = market.open_ledger(client, task, planned)
    people = [ps0, ps1, t0, t1]
    credited = 0
    for who, units in credits:
        if credited + units > planned:
            continue
        by = client if who < 2 else (ps0 if who == 2 else ps1)
        ledger.credit(by, people[who].address, units)
        credited += units
    names = {"t0": (t0, ps0), "t1": (t1, ps1)}
    for name in sorted(evict):
        ledger.evict(names[name][1], names[name][0].address, 0, "x")
    assert chain.balance(market.address) == budget == market.escrowed
    ledger.finish(client)
    before = [chain.balance(p.address) for p in people]
    market.settle(client, task)
    paid = [chain.balance(p.address) - b for p, b in zip(people, before)]
    assert sum(paid) <= budget
    for p, got in zip(people, paid):
        assert got == ledger.earned(p.address)
    assert chain.balance(market.address) == 0 == market.escrowed
