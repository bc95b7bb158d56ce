# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title TDML job ledger
@notice The private side of one job, made by the market from its blueprint.
        Only the client and participants hired on the market may write.
        Commitments (content ids and digests of shards, local models, gradients,
        scores, verdicts, the global model) are written once and never changed.
        Servers credit their trainers' verified work, the client credits the
        servers; an evicted trainer loses its credit. After `finish`, each
        participant has earned budget * units / planned_units.
"""

interface Market:
    def role(task_id: uint256, who: address) -> uint8: view
    def server_of(task_id: uint256, who: address) -> address: view

SERVER: constant(uint8) = 1
TRAINER: constant(uint8) = 2

struct Commitment:
    cid: String[100]
    digest: bytes32
    writer: address

event Committed:
    epoch: indexed(uint256)
    writer: indexed(address)
    kind: String[32]
    slot: String[32]
    cid: String[100]
    digest: bytes32

event Credited:
    who: indexed(address)
    units: uint256

event Evicted:
    trainer: indexed(address)
    epoch: uint256
    reason: String[100]

event Finished:
    credited: uint256

market: public(address)
task_id: public(uint256)
client: public(address)
budget: public(uint256)
planned_units: public(uint256)
credited: public(uint256)
finished: public(bool)
work: public(HashMap[address, uint256])
evicted: public(HashMap[address, bool])
commitments: public(HashMap[bytes32, Commitment])
global_epochs: public(uint256)


@deploy
def __init__(market: address, task_id: uint256, client: address, budget: uint256, planned_units: uint256):
    self.market = market
    self.task_id = task_id
    self.client = client
    self.budget = budget
    self.planned_units = planned_units


@view
@internal
def _role(who: address) -> uint8:
    return staticcall Market(self.market).role(self.task_id, who)


@view
@external
def key(epoch: uint256, kind: String[32], slot: String[32]) -> bytes32:
    return keccak256(abi_encode(epoch, kind, slot))


@external
def commit(epoch: uint256, kind: String[32], slot: String[32], cid: String[100], digest: bytes32):
    assert not self.finished, "job finished"
    assert msg.sender == self.client or self._role(msg.sender) > 0, "not hired"
    assert not self.evicted[msg.sender], "evicted"
    k: bytes32 = keccak256(abi_encode(epoch, kind, slot))
    assert self.commitments[k].writer == empty(address), "already committed"
    self.commitments[k] = Commitment(cid=cid, digest=digest, writer=msg.sender)
    if kind == "global" and epoch + 1 > self.global_epochs:
        self.global_epochs = epoch + 1
    log Committed(epoch=epoch, writer=msg.sender, kind=kind, slot=slot, cid=cid, digest=digest)


@external
def credit(who: address, units: uint256):
    assert not self.finished, "job finished"
    r: uint8 = self._role(who)
    if r == SERVER:
        assert msg.sender == self.client, "only the client credits a server"
    elif r == TRAINER:
        server: address = staticcall Market(self.market).server_of(self.task_id, who)
        assert msg.sender == server or msg.sender == self.client, "only its server credits a trainer"
    else:
        raise "not a participant"
    assert not self.evicted[who], "evicted"
    assert self.credited + units <= self.planned_units, "more work than planned"
    self.work[who] += units
    self.credited += units
    log Credited(who=who, units=units)


@external
def evict(trainer: address, epoch: uint256, reason: String[100]):
    assert not self.finished, "job finished"
    assert self._role(trainer) == TRAINER, "not a trainer"
    server: address = staticcall Market(self.market).server_of(self.task_id, trainer)
    assert msg.sender == server or msg.sender == self.client, "only its server or the client"
    assert not self.evicted[trainer], "already evicted"
    self.evicted[trainer] = True
    self.credited -= self.work[trainer]
    self.work[trainer] = 0
    log Evicted(trainer=trainer, epoch=epoch, reason=reason)


@external
def finish():
    assert msg.sender == self.client, "only the client"
    assert not self.finished, "already finished"
    self.finished = True
    log Finished(credited=self.credited)


@view
@external
def earned(who: address) -> uint256:
    if self.evicted[who]:
        return 0
    return self.budget * self.work[who] // self.planned_units
