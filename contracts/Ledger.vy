# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title TDML job ledger
@notice The private side of one job, made by the market from its blueprint.
        Every slot has one rightful writer, read from the market's hiring
        records: the client commits the job's inputs and the keys it seals;
        the server of pipeline p its plan and the keys it seals to its
        trainers; the trainer holding stage s of pipeline p that stage's
        weights, gradient and the Merkle root of its per-step records (the
        three at once with `commitWork`); the validator the ring assigns (the
        server of pipeline p+1) pipeline p's score and, as pipeline p's
        referee, the verification of its trainers; the aggregating server
        (pipeline 0's) attempts, stage inputs, verdicts and global models.
        Commitments are written once, only for epochs the job has, only in
        order; the block of an attempt's last trainer write is kept, and the
        hash of the block after it seeds the verifier's challenges.
        A participant is credited one unit per finished epoch whose
        commitments it wrote (trainers by their server, servers by the client),
        never more; an evicted trainer loses its credit. A trainer convicted
        with a fraud proof (by its server, the client or its referee) is
        evicted and forfeits its bond, which the market pays to the client.
        After `finish` (or when the market closes the ledger at the deadline),
        each participant has earned budget * units / planned_units.
"""

interface Market:
    def role(task_id: uint256, who: address) -> uint8: view
    def server_of(task_id: uint256, who: address) -> address: view
    def server_at(task_id: uint256, pipeline: uint256) -> address: view
    def holder(task_id: uint256, pipeline: uint256, stage: uint256) -> address: view
    def pipeline_of(task_id: uint256, who: address) -> uint256: view
    def stage_of(task_id: uint256, who: address) -> uint256: view

SERVER: constant(uint8) = 1
TRAINER: constant(uint8) = 2

# Kinds of commitment. Job set-up (epoch 0, attempt 0):
SPEC: constant(uint8) = 1  # client: the job spec
CLIENT_KEYS: constant(uint8) = 2  # client: the job's root keys, sealed to itself
SERVER_KEYS: constant(uint8) = 3  # client: the servers' keys, sealed to the server of `pipeline`
DATA_KEY: constant(uint8) = 4  # client: `pipeline`'s data key, sealed to trainer (pipeline, stage)
DATA: constant(uint8) = 5  # client: `pipeline`'s data shard
EVAL: constant(uint8) = 6  # client: the set local models are scored on
K_INIT: constant(uint8) = 7  # client: the initial model
PLAN: constant(uint8) = 8  # server of `pipeline`: its stage plan and trainers
TRAINER_KEYS: constant(uint8) = 9  # server of `pipeline`: stage keys sealed to trainer (pipeline, stage)
# Per epoch:
ATTEMPT: constant(uint8) = 10  # aggregator: an attempt at the epoch starts (0, then 1 after a crash, ...)
STAGE: constant(uint8) = 11  # aggregator: `stage`'s slice of the previous global model
WEIGHTS: constant(uint8) = 12  # trainer (pipeline, stage): its trained weights
GRAD: constant(uint8) = 13  # trainer (pipeline, stage): its epoch gradient
SCORE: constant(uint8) = 14  # validator of `pipeline`: the local model's score
VERDICTS: constant(uint8) = 15  # aggregator: detection's verdicts
K_GLOBAL: constant(uint8) = 16  # aggregator: the global model
ROOT: constant(uint8) = 17  # trainer (pipeline, stage): Merkle root of its per-step records (cid: "leaves:N")
CHECKS: constant(uint8) = 18  # referee of `pipeline` (its validator): the verification of its trainers
LAST_KIND: constant(uint8) = 18

MAX_ATTEMPTS: public(constant(uint256)) = 8
MAX_CREDIT_BATCH: constant(uint256) = 1024

struct Commitment:
    cid: String[100]
    digest: bytes32
    writer: address

event Committed:
    epoch: indexed(uint256)
    writer: indexed(address)
    kind: uint8
    pipeline: uint256
    stage: uint256
    attempt: uint256
    cid: String[100]
    digest: bytes32

event Credited:
    who: indexed(address)
    epoch: uint256

event Evicted:
    trainer: indexed(address)
    epoch: uint256
    reason: String[100]

event Convicted:
    trainer: indexed(address)
    epoch: uint256
    reason: String[100]
    proof: bytes32

event Finished:
    credited: uint256

market: public(address)
task_id: public(uint256)
client: public(address)
budget: public(uint256)
planned_units: public(uint256)
epochs: public(uint256)
splits: public(uint256)
stages: public(uint256)
credited: public(uint256)
finished: public(bool)
closed: public(bool)
work: public(HashMap[address, uint256])
credited_for: public(HashMap[address, HashMap[uint256, bool]])  # who -> epoch -> credited
evicted: public(HashMap[address, bool])
forfeited: public(HashMap[address, bool])  # convicted with a proof: its bond goes to the client
proof_of: public(HashMap[address, bytes32])  # the fraud proof a trainer was convicted with
commitments: public(HashMap[bytes32, Commitment])
attempts: public(HashMap[uint256, uint256])  # epoch -> attempts started
global_epochs: public(uint256)
last_work_block: public(HashMap[uint256, HashMap[uint256, uint256]])  # epoch -> attempt -> block of its last trainer write


@deploy
def __init__(market: address, task_id: uint256, client: address, budget: uint256, planned_units: uint256,
             epochs: uint256, splits: uint256, stages: uint256):
    self.market = market
    self.task_id = task_id
    self.client = client
    self.budget = budget
    self.planned_units = planned_units
    self.epochs = epochs
    self.splits = splits
    self.stages = stages


@pure
@internal
def _key(epoch: uint256, kind: uint8, pipeline: uint256, stage: uint256, attempt: uint256) -> bytes32:
    return keccak256(abi_encode(epoch, kind, pipeline, stage, attempt))


@pure
@external
def key(epoch: uint256, kind: uint8, pipeline: uint256, stage: uint256, attempt: uint256) -> bytes32:
    return self._key(epoch, kind, pipeline, stage, attempt)


@view
@internal
def _server_at(pipeline: uint256) -> address:
    return staticcall Market(self.market).server_at(self.task_id, pipeline)


@view
@internal
def _owner(epoch: uint256, kind: uint8, pipeline: uint256, stage: uint256, attempt: uint256) -> address:
    """The one address that may write this slot; reverts when the slot does not exist."""
    assert kind >= SPEC and kind <= LAST_KIND, "unknown kind"
    assert pipeline < self.splits, "no such pipeline"
    assert stage < self.stages, "no such stage"
    if kind < ATTEMPT:
        # a trainer's keys are sealed again to each replacement: `attempt` numbers the slot's holders
        assert epoch == 0 and (attempt == 0 or ((kind == DATA_KEY or kind == TRAINER_KEYS) and attempt < MAX_ATTEMPTS)), \
            "set-up is committed at epoch 0"
        if kind == SERVER_KEYS or kind == DATA or kind == PLAN:
            assert stage == 0, "a pipeline's slot has stage 0"
        elif kind == SPEC or kind == CLIENT_KEYS or kind == EVAL or kind == K_INIT:
            assert pipeline == 0 and stage == 0, "a job's slot has pipeline 0, stage 0"
        if kind == DATA_KEY or kind == TRAINER_KEYS:
            assert staticcall Market(self.market).holder(self.task_id, pipeline, stage) != empty(address), \
                "stage not hired"
        if kind == PLAN or kind == TRAINER_KEYS:
            return self._server_at(pipeline)
        return self.client
    assert epoch < self.epochs, "beyond the job's epochs"
    assert epoch >= self.global_epochs, "epoch already has its global model"
    started: uint256 = self.attempts[epoch]
    if kind == ATTEMPT:
        assert pipeline == 0 and stage == 0, "a job's slot has pipeline 0, stage 0"
        assert attempt == started, "attempts start in order"
        assert attempt < MAX_ATTEMPTS, "too many attempts"
        assert epoch == self.global_epochs, "epochs run in order"
        return self._server_at(0)
    if kind == STAGE:
        assert pipeline == 0 and attempt == 0, "a stage input has pipeline 0, attempt 0"
        assert epoch == self.global_epochs, "epochs run in order"
        return self._server_at(0)
    assert started > 0 and attempt == started - 1, "not the epoch's current attempt"
    if kind == WEIGHTS or kind == GRAD or kind == ROOT:
        return staticcall Market(self.market).holder(self.task_id, pipeline, stage)
    assert stage == 0, "a pipeline's slot has stage 0"
    if kind == SCORE or kind == CHECKS:
        return self._server_at((pipeline + 1) % self.splits)
    assert pipeline == 0, "a job's slot has pipeline 0, stage 0"
    return self._server_at(0)  # VERDICTS, K_GLOBAL


@view
@external
def owner(epoch: uint256, kind: uint8, pipeline: uint256, stage: uint256, attempt: uint256) -> address:
    return self._owner(epoch, kind, pipeline, stage, attempt)


@internal
def _commit(epoch: uint256, kind: uint8, pipeline: uint256, stage: uint256, attempt: uint256,
            cid: String[100], digest: bytes32):
    assert not self.finished and not self.closed, "job finished"
    assert not self.evicted[msg.sender], "evicted"
    assert msg.sender == self._owner(epoch, kind, pipeline, stage, attempt), "not this slot's writer"
    k: bytes32 = self._key(epoch, kind, pipeline, stage, attempt)
    assert self.commitments[k].writer == empty(address), "already committed"
    if kind == K_GLOBAL:
        assert self.commitments[self._key(epoch, VERDICTS, 0, 0, attempt)].writer != empty(address), \
            "verdicts first"
        self.global_epochs = epoch + 1
    elif kind == ATTEMPT:
        self.attempts[epoch] = attempt + 1
    elif kind == WEIGHTS or kind == GRAD or kind == ROOT:
        # Written twice, so that the write costs the same gas whether or not the slot already holds this
        # block's number: a gas estimate made against the latest block (whose number the slot may hold)
        # must still be enough in the next block (whose number it does not).
        self.last_work_block[epoch][attempt] = max_value(uint256)
        self.last_work_block[epoch][attempt] = block.number
    self.commitments[k] = Commitment(cid=cid, digest=digest, writer=msg.sender)
    log Committed(epoch=epoch, writer=msg.sender, kind=kind, pipeline=pipeline, stage=stage, attempt=attempt,
                  cid=cid, digest=digest)


@external
def commit(epoch: uint256, kind: uint8, pipeline: uint256, stage: uint256, attempt: uint256,
           cid: String[100], digest: bytes32):
    self._commit(epoch, kind, pipeline, stage, attempt, cid, digest)


@external
def commitWork(epoch: uint256, pipeline: uint256, stage: uint256, attempt: uint256,
               weights_cid: String[100], weights_digest: bytes32, grad_cid: String[100], grad_digest: bytes32,
               root_cid: String[100], root: bytes32):
    """A trainer's weights, gradient and records' root for (epoch, pipeline, stage, attempt), in one transaction."""
    self._commit(epoch, WEIGHTS, pipeline, stage, attempt, weights_cid, weights_digest)
    self._commit(epoch, GRAD, pipeline, stage, attempt, grad_cid, grad_digest)
    self._commit(epoch, ROOT, pipeline, stage, attempt, root_cid, root)


@view
@internal
def _did_work(who: address, r: uint8, epoch: uint256) -> bool:
    """Whether `who` wrote its commitments of `epoch`'s final attempt."""
    attempt: uint256 = self.attempts[epoch] - 1
    p: uint256 = staticcall Market(self.market).pipeline_of(self.task_id, who)
    if r == TRAINER:
        s: uint256 = staticcall Market(self.market).stage_of(self.task_id, who)
        return self.commitments[self._key(epoch, WEIGHTS, p, s, attempt)].writer == who \
            and self.commitments[self._key(epoch, GRAD, p, s, attempt)].writer == who
    validated: uint256 = (p + self.splits - 1) % self.splits  # the pipeline this server scores
    return self.commitments[self._key(epoch, SCORE, validated, 0, attempt)].writer == who


@external
def credit(who: address, epochs: DynArray[uint256, MAX_CREDIT_BATCH]):
    """One unit for each finished epoch whose commitments `who` wrote, once per epoch."""
    assert not self.finished and not self.closed, "job finished"
    r: uint8 = staticcall Market(self.market).role(self.task_id, who)
    if r == SERVER:
        assert msg.sender == self.client, "only the client credits a server"
    elif r == TRAINER:
        assert msg.sender == staticcall Market(self.market).server_of(self.task_id, who), \
            "only its server credits a trainer"
    else:
        raise "not a participant"
    assert not self.evicted[who], "evicted"
    for e: uint256 in epochs:
        assert e < self.global_epochs, "epoch not finished"
        assert not self.credited_for[who][e], "already credited for this epoch"
        assert self._did_work(who, r, e), "no commitments of its own in this epoch"
        self.credited_for[who][e] = True
        log Credited(who=who, epoch=e)
    self.work[who] += len(epochs)
    self.credited += len(epochs)


@external
def evict(trainer: address, epoch: uint256, reason: String[100]):
    assert not self.finished and not self.closed, "job finished"
    assert staticcall Market(self.market).role(self.task_id, trainer) == TRAINER, "not a trainer"
    server: address = staticcall Market(self.market).server_of(self.task_id, trainer)
    assert msg.sender == server or msg.sender == self.client, "only its server or the client"
    assert not self.evicted[trainer], "already evicted"
    assert epoch < self.epochs, "beyond the job's epochs"
    self.evicted[trainer] = True
    self.credited -= self.work[trainer]
    self.work[trainer] = 0
    log Evicted(trainer=trainer, epoch=epoch, reason=reason)


@external
def convict(trainer: address, epoch: uint256, reason: String[100], proof: bytes32):
    """Eviction with a fraud proof: the trainer also forfeits its bond to the client. A trainer evicted
    without a proof may still be convicted (its credit is not taken twice); no one is convicted twice."""
    assert not self.finished and not self.closed, "job finished"
    assert staticcall Market(self.market).role(self.task_id, trainer) == TRAINER, "not a trainer"
    server: address = staticcall Market(self.market).server_of(self.task_id, trainer)
    p: uint256 = staticcall Market(self.market).pipeline_of(self.task_id, trainer)
    referee: address = self._server_at((p + 1) % self.splits)
    assert msg.sender == server or msg.sender == self.client or msg.sender == referee, \
        "only its server, the client or its referee"
    assert not self.forfeited[trainer], "already convicted"
    assert epoch < self.epochs, "beyond the job's epochs"
    if not self.evicted[trainer]:
        self.evicted[trainer] = True
        self.credited -= self.work[trainer]
        self.work[trainer] = 0
    self.forfeited[trainer] = True
    self.proof_of[trainer] = proof
    log Convicted(trainer=trainer, epoch=epoch, reason=reason, proof=proof)


@external
def finish():
    assert msg.sender == self.client, "only the client"
    assert not self.finished and not self.closed, "already finished"
    self.finished = True
    log Finished(credited=self.credited)


@external
def close():
    """The market freezes the ledger when it settles the task (after `finish`, or at the deadline)."""
    assert msg.sender == self.market, "only the market"
    self.closed = True


@view
@external
def earned(who: address) -> uint256:
    if self.evicted[who]:
        return 0
    return self.budget * self.work[who] // self.planned_units
