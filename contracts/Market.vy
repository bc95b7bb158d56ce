# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title TDML market
@notice The public side of a job. A client publishes a task under a salt of its
        own choosing (so a client that crashed finds its task again), escrows
        the reward budget and sets a deadline. Parameter servers register for
        the task with a bond and the client hires one per pipeline; each hired
        server posts a trainer hiring message, trainers offer with a bond, and
        the server hires one per stage. Opening the job's ledger (made from the
        ledger blueprint) closes hiring: after that a slot changes hands only
        when its trainer was evicted on the ledger. The money leaves escrow
        only through `settle` (once: the client after finishing the job, or
        anyone after the deadline) and `claim` (each participant's earnings and
        bond, once), never more than the budget and the bonds it holds. A bond
        is returned at claim unless its depositor was convicted on the ledger
        (evicted with a fraud proof): then it goes to the client.
"""

interface Ledger:
    def earned(who: address) -> uint256: view
    def finished() -> bool: view
    def evicted(who: address) -> bool: view
    def forfeited(who: address) -> bool: view
    def credited() -> uint256: view
    def planned_units() -> uint256: view
    def close(): nonpayable

MAX_BATCH: constant(uint256) = 256  # servers or trainers hired in one call
MAX_PIPELINES: public(constant(uint256)) = 4096
MAX_STAGES: public(constant(uint256)) = 64

SERVER: constant(uint8) = 1
TRAINER: constant(uint8) = 2

struct Task:
    client: address
    name: String[64]
    budget: uint256
    bond: uint256
    min_memory: uint256
    min_cpus: uint256
    splits: uint256
    stages: uint256
    epochs: uint256
    deadline: uint256
    ledger: address
    ledger_block: uint256
    servers: uint256
    filled: uint256
    settled: bool

struct Offer:
    server: address
    memory: uint256
    cpus: uint256

event TaskPublished:
    task_id: indexed(uint256)
    client: indexed(address)
    salt: bytes32
    name: String[64]
    budget: uint256
    splits: uint256
    stages: uint256
    epochs: uint256
    deadline: uint256
    bond: uint256

event Registered:
    task_id: indexed(uint256)
    who: indexed(address)
    memory: uint256
    cpus: uint256

event Hired:
    task_id: indexed(uint256)
    who: indexed(address)
    role: uint8
    server: address
    pipeline: uint256
    stage: uint256

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

event OfferWithdrawn:
    task_id: indexed(uint256)
    who: indexed(address)

event LedgerOpened:
    task_id: indexed(uint256)
    ledger: address

event Replaced:
    task_id: indexed(uint256)
    old: indexed(address)
    new: indexed(address)
    pipeline: uint256
    stage: uint256

event Settled:
    task_id: indexed(uint256)
    refund: uint256
    expired: bool

event Paid:
    task_id: indexed(uint256)
    who: indexed(address)
    amount: uint256
    pushed: bool

ledger_blueprint: public(immutable(address))
task_count: public(uint256)
tasks: public(HashMap[uint256, Task])
task_of: public(HashMap[address, HashMap[bytes32, uint256]])  # client -> salt -> task id + 1
pubkey: public(HashMap[uint256, HashMap[address, bytes32]])  # X25519 keys, each set by its owner
role: public(HashMap[uint256, HashMap[address, uint8]])
server_of: public(HashMap[uint256, HashMap[address, address]])
server_at: public(HashMap[uint256, HashMap[uint256, address]])  # pipeline -> its server
pipeline_of: public(HashMap[uint256, HashMap[address, uint256]])
stage_of: public(HashMap[uint256, HashMap[address, uint256]])
holder: public(HashMap[uint256, HashMap[uint256, HashMap[uint256, address]]])  # pipeline -> stage -> trainer
servers: public(HashMap[uint256, HashMap[address, Offer]])  # server registrations per task
offers: public(HashMap[uint256, HashMap[address, Offer]])  # trainer offers per task
hiring_open: public(HashMap[uint256, HashMap[address, bool]])
bonded: public(HashMap[uint256, HashMap[address, uint256]])  # bond held per task and depositor
claimed: public(HashMap[uint256, HashMap[address, bool]])
owed: public(HashMap[address, uint256])
escrowed: public(uint256)


@deploy
def __init__(blueprint: address):
    ledger_blueprint = blueprint


@external
@payable
def publishTask(salt: bytes32, name: String[64], min_memory: uint256, min_cpus: uint256, splits: uint256,
                stages: uint256, epochs: uint256, deadline: uint256, bond: uint256, pubkey: bytes32) -> uint256:
    assert msg.value > 0, "no budget"
    assert splits >= 2 and splits <= MAX_PIPELINES, "splits out of range"  # pipeline P is scored by the server of P+1
    assert stages > 0 and stages <= MAX_STAGES, "stages out of range"
    assert epochs > 0, "no epochs"
    assert deadline > block.timestamp, "deadline passed"
    assert self.task_of[msg.sender][salt] == 0, "salt used"
    task_id: uint256 = self.task_count
    self.task_count = task_id + 1
    self.task_of[msg.sender][salt] = task_id + 1
    self.tasks[task_id] = Task(
        client=msg.sender, name=name, budget=msg.value, bond=bond, min_memory=min_memory, min_cpus=min_cpus,
        splits=splits, stages=stages, epochs=epochs, deadline=deadline, ledger=empty(address), ledger_block=0,
        servers=0, filled=0, settled=False,
    )
    self.pubkey[task_id][msg.sender] = pubkey
    self.escrowed += msg.value
    log TaskPublished(
        task_id=task_id, client=msg.sender, salt=salt, name=name, budget=msg.value, splits=splits,
        stages=stages, epochs=epochs, deadline=deadline, bond=bond,
    )
    return task_id


@internal
def _deposit(task_id: uint256, paid: uint256, pubkey: bytes32):
    assert paid == self.tasks[task_id].bond, "bond is the task's bond"
    self.bonded[task_id][msg.sender] = paid
    self.escrowed += paid
    self.pubkey[task_id][msg.sender] = pubkey


@external
@payable
def register(task_id: uint256, memory: uint256, cpus: uint256, pubkey: bytes32):
    task: Task = self.tasks[task_id]
    assert task.client != empty(address), "no such task"
    assert task.ledger == empty(address) and not task.settled, "hiring closed"
    assert memory > 0 and cpus > 0, "empty spec"
    assert self.role[task_id][msg.sender] == 0 and msg.sender != task.client, "already in this task"
    assert self.servers[task_id][msg.sender].memory == 0 and self.offers[task_id][msg.sender].memory == 0, \
        "already offered"
    self._deposit(task_id, msg.value, pubkey)
    self.servers[task_id][msg.sender] = Offer(server=msg.sender, memory=memory, cpus=cpus)
    log Registered(task_id=task_id, who=msg.sender, memory=memory, cpus=cpus)


@external
def hireServers(task_id: uint256, chosen: DynArray[address, MAX_BATCH]):
    task: Task = self.tasks[task_id]
    assert msg.sender == task.client, "only the client"
    assert task.ledger == empty(address) and not task.settled, "hiring closed"
    assert task.servers + len(chosen) <= task.splits, "one server per split"
    p: uint256 = task.servers
    for s: address in chosen:
        spec: Offer = self.servers[task_id][s]
        assert spec.memory > 0, "not registered"
        assert spec.memory >= task.min_memory and spec.cpus >= task.min_cpus, "below baseline"
        assert self.role[task_id][s] == 0, "hired twice"
        self.role[task_id][s] = SERVER
        self.server_of[task_id][s] = s
        self.server_at[task_id][p] = s
        self.pipeline_of[task_id][s] = p
        log Hired(task_id=task_id, who=s, role=SERVER, server=s, pipeline=p, stage=0)
        p += 1
    self.tasks[task_id].servers = p


@external
def postTrainerHiring(task_id: uint256, stages: uint256, min_memory: uint256):
    assert self.role[task_id][msg.sender] == SERVER, "only a hired server"
    assert not self.tasks[task_id].settled, "task settled"
    assert stages == self.tasks[task_id].stages, "stages differ from the task's"
    self.hiring_open[task_id][msg.sender] = True
    log TrainerHiring(task_id=task_id, server=msg.sender, stages=stages, min_memory=min_memory)


@external
@payable
def offerTrainer(task_id: uint256, server: address, memory: uint256, cpus: uint256, pubkey: bytes32):
    assert self.hiring_open[task_id][server], "server is not hiring"
    assert not self.tasks[task_id].settled, "task settled"
    assert self.role[task_id][msg.sender] == 0 and msg.sender != self.tasks[task_id].client, "already in this task"
    assert self.servers[task_id][msg.sender].memory == 0 and self.offers[task_id][msg.sender].memory == 0, \
        "already offered"
    assert memory > 0 and cpus > 0, "empty spec"
    self._deposit(task_id, msg.value, pubkey)
    self.offers[task_id][msg.sender] = Offer(server=server, memory=memory, cpus=cpus)
    log TrainerOffer(task_id=task_id, server=server, trainer=msg.sender, memory=memory, cpus=cpus)


@internal
def _hire_trainer(task_id: uint256, server: address, t: address, p: uint256, s: uint256):
    assert self.offers[task_id][t].server == server, "no offer from trainer"
    assert self.role[task_id][t] == 0, "hired twice"
    self.role[task_id][t] = TRAINER
    self.server_of[task_id][t] = server
    self.pipeline_of[task_id][t] = p
    self.stage_of[task_id][t] = s
    self.holder[task_id][p][s] = t
    log Hired(task_id=task_id, who=t, role=TRAINER, server=server, pipeline=p, stage=s)


@external
def hireTrainers(task_id: uint256, chosen: DynArray[address, MAX_BATCH], stages: DynArray[uint256, MAX_BATCH]):
    task: Task = self.tasks[task_id]
    assert self.role[task_id][msg.sender] == SERVER, "only a hired server"
    assert task.ledger == empty(address) and not task.settled, "hiring closed"
    assert len(chosen) == len(stages), "one stage per trainer"
    p: uint256 = self.pipeline_of[task_id][msg.sender]
    i: uint256 = 0
    for t: address in chosen:
        s: uint256 = stages[i]
        assert s < task.stages, "no such stage"
        assert self.holder[task_id][p][s] == empty(address), "stage taken"
        self._hire_trainer(task_id, msg.sender, t, p, s)
        i += 1
    self.tasks[task_id].filled = task.filled + len(chosen)


@external
def replaceTrainer(task_id: uint256, old: address, new: address):
    """The only hiring after the ledger opens: a standby takes the slot of a trainer evicted on the ledger."""
    task: Task = self.tasks[task_id]
    assert task.ledger != empty(address), "ledger not open"
    assert not task.settled, "task settled"
    assert self.role[task_id][old] == TRAINER and self.server_of[task_id][old] == msg.sender, "only its server"
    assert staticcall Ledger(task.ledger).evicted(old), "trainer not evicted"
    p: uint256 = self.pipeline_of[task_id][old]
    s: uint256 = self.stage_of[task_id][old]
    assert self.holder[task_id][p][s] == old, "slot already replaced"
    self._hire_trainer(task_id, msg.sender, new, p, s)
    log Replaced(task_id=task_id, old=old, new=new, pipeline=p, stage=s)


@external
def openLedger(task_id: uint256) -> address:
    task: Task = self.tasks[task_id]
    assert msg.sender == task.client, "only the client"
    assert not task.settled, "task settled"
    assert task.ledger == empty(address), "ledger already open"
    assert task.servers == task.splits, "hire servers first"
    assert task.filled == task.splits * task.stages, "hire every stage first"
    planned: uint256 = task.epochs * task.splits * (1 + task.stages)
    ledger: address = create_from_blueprint(
        ledger_blueprint, self, task_id, task.client, task.budget, planned, task.epochs, task.splits, task.stages
    )
    self.tasks[task_id].ledger = ledger
    self.tasks[task_id].ledger_block = block.number
    log LedgerOpened(task_id=task_id, ledger=ledger)
    return ledger


@internal
def _pay(task_id: uint256, who: address, amount: uint256):
    # A recipient that refuses the transfer (or tries to re-enter) is owed instead.
    self.escrowed -= amount
    ok: bool = raw_call(who, b"", value=amount, revert_on_failure=False)
    if not ok:
        self.owed[who] += amount
        self.escrowed += amount
    log Paid(task_id=task_id, who=who, amount=amount, pushed=ok)


@external
@nonreentrant
def withdrawOffer(task_id: uint256):
    """A bond whose offer was never taken goes back to its depositor."""
    assert self.role[task_id][msg.sender] == 0, "hired: the bond is held until settlement"
    amount: uint256 = self.bonded[task_id][msg.sender]
    assert amount > 0, "no bond"
    self.bonded[task_id][msg.sender] = 0
    self.offers[task_id][msg.sender] = empty(Offer)
    self.servers[task_id][msg.sender] = empty(Offer)
    log OfferWithdrawn(task_id=task_id, who=msg.sender)
    self._pay(task_id, msg.sender, amount)


@external
@nonreentrant
def settle(task_id: uint256):
    task: Task = self.tasks[task_id]
    assert task.client != empty(address), "no such task"
    assert not task.settled, "already settled"
    expired: bool = block.timestamp >= task.deadline
    if not expired:
        assert msg.sender == task.client, "only the client before the deadline"
        assert task.ledger != empty(address), "no ledger"
        assert staticcall Ledger(task.ledger).finished(), "job not finished"
    self.tasks[task_id].settled = True
    refund: uint256 = task.budget
    if task.ledger != empty(address):
        extcall Ledger(task.ledger).close()
        credited: uint256 = staticcall Ledger(task.ledger).credited()
        planned: uint256 = staticcall Ledger(task.ledger).planned_units()
        refund = task.budget - task.budget * credited // planned
    log Settled(task_id=task_id, refund=refund, expired=expired)
    if refund > 0:
        self._pay(task_id, task.client, refund)


@external
@nonreentrant
def claim(task_id: uint256, who: address):
    """After settlement, once: `who`'s earnings and its bond, paid to `who`. A bond its depositor
    forfeited (convicted on the ledger) is paid to the task's client instead, and `who` gets its
    earnings only (none, once evicted). Anyone may trigger it."""
    task: Task = self.tasks[task_id]
    assert task.settled, "not settled"
    assert not self.claimed[task_id][who], "already claimed"
    self.claimed[task_id][who] = True
    amount: uint256 = 0
    forfeit: bool = False
    if task.ledger != empty(address) and self.role[task_id][who] != 0:
        amount = staticcall Ledger(task.ledger).earned(who)
        forfeit = staticcall Ledger(task.ledger).forfeited(who)
    bond: uint256 = self.bonded[task_id][who]
    self.bonded[task_id][who] = 0
    to_client: uint256 = 0
    if forfeit:
        to_client = bond
    else:
        amount += bond
    assert amount + to_client > 0, "nothing to claim"
    if to_client > 0:
        self._pay(task_id, task.client, to_client)
    if amount > 0:
        self._pay(task_id, who, amount)


@external
@nonreentrant
def withdraw():
    amount: uint256 = self.owed[msg.sender]
    assert amount > 0, "nothing owed"
    self.owed[msg.sender] = 0
    self.escrowed -= amount
    raw_call(msg.sender, b"", value=amount)
