# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title TDML market
@notice The public side of a job: a client publishes a task and escrows its
        reward budget; parameter servers register and are hired; hired servers
        post trainer hiring messages, trainers answer with their specs, and the
        server hires them. Each task gets a ledger made from the ledger
        blueprint, and the budget leaves escrow only through `settle`, once,
        paying what the ledger says was earned and refunding the rest.
"""

interface Ledger:
    def earned(who: address) -> uint256: view
    def finished() -> bool: view

MAX_SERVERS: constant(uint256) = 16
MAX_TRAINERS: constant(uint256) = 16
MAX_PARTICIPANTS: constant(uint256) = 272  # 16 servers, each with 16 trainers

SERVER: constant(uint8) = 1
TRAINER: constant(uint8) = 2

struct Task:
    client: address
    name: String[64]
    budget: uint256
    min_memory: uint256
    min_cpus: uint256
    splits: uint256
    ledger: address
    hired: bool
    settled: bool

struct Spec:
    memory: uint256
    cpus: uint256

event TaskPublished:
    task_id: indexed(uint256)
    client: indexed(address)
    name: String[64]
    budget: uint256
    min_memory: uint256
    min_cpus: uint256
    splits: uint256

event Registered:
    who: indexed(address)
    memory: uint256
    cpus: uint256

event Hired:
    task_id: indexed(uint256)
    who: indexed(address)
    role: uint8
    server: address

event TrainerHiring:
    task_id: indexed(uint256)
    server: indexed(address)
    stages: uint256
    min_memory: uint256

event TrainerOffer:
    task_id: indexed(uint256)
    server: indexed(address)
    trainer: indexed(address)
    memory: uint256
    cpus: uint256

event LedgerOpened:
    task_id: indexed(uint256)
    ledger: address

event Paid:
    task_id: indexed(uint256)
    who: indexed(address)
    amount: uint256
    pushed: bool

event Refunded:
    task_id: indexed(uint256)
    client: indexed(address)
    amount: uint256

ledger_blueprint: public(immutable(address))
task_count: public(uint256)
tasks: public(HashMap[uint256, Task])
servers: public(HashMap[address, Spec])
role: public(HashMap[uint256, HashMap[address, uint8]])
server_of: public(HashMap[uint256, HashMap[address, address]])
offers: public(HashMap[uint256, HashMap[address, HashMap[address, Spec]]])
hiring_open: public(HashMap[uint256, HashMap[address, bool]])
participants: HashMap[uint256, DynArray[address, MAX_PARTICIPANTS]]
owed: public(HashMap[address, uint256])
escrowed: public(uint256)


@deploy
def __init__(blueprint: address):
    ledger_blueprint = blueprint


@external
@payable
def publishTask(name: String[64], min_memory: uint256, min_cpus: uint256, splits: uint256) -> uint256:
    assert msg.value > 0, "no budget"
    assert splits > 0 and splits <= MAX_SERVERS, "splits out of range"
    task_id: uint256 = self.task_count
    self.task_count = task_id + 1
    self.tasks[task_id] = Task(
        client=msg.sender, name=name, budget=msg.value, min_memory=min_memory, min_cpus=min_cpus,
        splits=splits, ledger=empty(address), hired=False, settled=False,
    )
    self.escrowed += msg.value
    log TaskPublished(
        task_id=task_id, client=msg.sender, name=name, budget=msg.value,
        min_memory=min_memory, min_cpus=min_cpus, splits=splits,
    )
    return task_id


@external
def register(memory: uint256, cpus: uint256):
    assert memory > 0 and cpus > 0, "empty spec"
    self.servers[msg.sender] = Spec(memory=memory, cpus=cpus)
    log Registered(who=msg.sender, memory=memory, cpus=cpus)


@external
def hireServers(task_id: uint256, chosen: DynArray[address, MAX_SERVERS]):
    task: Task = self.tasks[task_id]
    assert msg.sender == task.client, "only the client"
    assert not task.hired, "already hired"
    assert len(chosen) == task.splits, "one server per split"
    for s: address in chosen:
        spec: Spec = self.servers[s]
        assert spec.memory > 0, "not registered"
        assert spec.memory >= task.min_memory and spec.cpus >= task.min_cpus, "below baseline"
        assert self.role[task_id][s] == 0, "hired twice"
        self.role[task_id][s] = SERVER
        self.participants[task_id].append(s)
        log Hired(task_id=task_id, who=s, role=SERVER, server=s)
    self.tasks[task_id].hired = True


@external
def postTrainerHiring(task_id: uint256, stages: uint256, min_memory: uint256):
    assert self.role[task_id][msg.sender] == SERVER, "only a hired server"
    assert stages > 0 and stages <= MAX_TRAINERS, "stages out of range"
    self.hiring_open[task_id][msg.sender] = True
    log TrainerHiring(task_id=task_id, server=msg.sender, stages=stages, min_memory=min_memory)


@external
def offerTrainer(task_id: uint256, server: address, memory: uint256, cpus: uint256):
    assert self.hiring_open[task_id][server], "server is not hiring"
    assert self.role[task_id][msg.sender] == 0, "already in this task"
    assert memory > 0 and cpus > 0, "empty spec"
    self.offers[task_id][server][msg.sender] = Spec(memory=memory, cpus=cpus)
    log TrainerOffer(task_id=task_id, server=server, trainer=msg.sender, memory=memory, cpus=cpus)


@external
def hireTrainers(task_id: uint256, chosen: DynArray[address, MAX_TRAINERS]):
    assert self.role[task_id][msg.sender] == SERVER, "only a hired server"
    assert not self.tasks[task_id].settled, "task settled"
    for t: address in chosen:
        assert self.offers[task_id][msg.sender][t].memory > 0, "no offer from trainer"
        assert self.role[task_id][t] == 0, "hired twice"
        self.role[task_id][t] = TRAINER
        self.server_of[task_id][t] = msg.sender
        self.participants[task_id].append(t)
        log Hired(task_id=task_id, who=t, role=TRAINER, server=msg.sender)


@external
def openLedger(task_id: uint256, planned_units: uint256) -> address:
    task: Task = self.tasks[task_id]
    assert msg.sender == task.client, "only the client"
    assert task.hired, "hire servers first"
    assert task.ledger == empty(address), "ledger already open"
    assert planned_units > 0, "no work planned"
    ledger: address = create_from_blueprint(
        ledger_blueprint, self, task_id, task.client, task.budget, planned_units
    )
    self.tasks[task_id].ledger = ledger
    log LedgerOpened(task_id=task_id, ledger=ledger)
    return ledger


@view
@external
def participantsOf(task_id: uint256) -> DynArray[address, MAX_PARTICIPANTS]:
    return self.participants[task_id]


@internal
def _pay(task_id: uint256, who: address, amount: uint256):
    # A recipient that refuses the transfer (or tries to re-enter) is owed instead.
    ok: bool = raw_call(who, b"", value=amount, revert_on_failure=False)
    if not ok:
        self.owed[who] += amount
        self.escrowed += amount
    log Paid(task_id=task_id, who=who, amount=amount, pushed=ok)


@external
@nonreentrant
def settle(task_id: uint256):
    task: Task = self.tasks[task_id]
    assert msg.sender == task.client, "only the client"
    assert task.ledger != empty(address), "no ledger"
    assert not task.settled, "already settled"
    assert staticcall Ledger(task.ledger).finished(), "job not finished"
    self.tasks[task_id].settled = True
    self.escrowed -= task.budget
    amounts: DynArray[uint256, MAX_PARTICIPANTS] = []
    paid: uint256 = 0
    for who: address in self.participants[task_id]:
        amount: uint256 = staticcall Ledger(task.ledger).earned(who)
        amounts.append(amount)
        paid += amount
    assert paid <= task.budget, "ledger overpays"
    i: uint256 = 0
    for who: address in self.participants[task_id]:
        if amounts[i] > 0:
            self._pay(task_id, who, amounts[i])
        i += 1
    refund: uint256 = task.budget - paid
    if refund > 0:
        self._pay(task_id, task.client, refund)
    log Refunded(task_id=task_id, client=task.client, amount=refund)


@external
@nonreentrant
def withdraw():
    amount: uint256 = self.owed[msg.sender]
    assert amount > 0, "nothing owed"
    self.owed[msg.sender] = 0
    self.escrowed -= amount
    raw_call(msg.sender, b"", value=amount)
