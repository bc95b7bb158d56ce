"""One pipeline stage as its own OS process.

The process joins its pipeline's gloo (or NCCL) group, derives its stage module
from the job spec and the plan exactly as every other stage does, and then
serves commands from the coordinator over a pipe: train an epoch starting from
given weights, or compute the gradients of one batch (used to check the split).

Under the protocol (``StageArgs.source`` set) the stage is a trainer: it loads
its own key, opens the secrets its parameter server sealed to it, fetches its
data shard and, each epoch, its stage's weights from the store by id, checking
digests; it puts its trained weights and its epoch gradient back into the store
and answers with their ids and digests only, which is what it commits.
"""

from __future__ import annotations

import copy
import sys
import time
import traceback
from dataclasses import dataclass, replace as with_fields
from functools import partial
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tdml_core import attacks
from tdml_core.artifacts import get_state, put_state
from tdml_core.config import JobSpec
from tdml_core.data import shard
from tdml_core.model import StagePlan, split_model
from tdml_core.model.split import quiet_trace_warnings
from tdml_core.runtime import link
from tdml_core.runtime.context import example_microbatch, load_job, make_optimizer, model_for, round_batches
from tdml_core.verify import merkle, signing
from tdml_core.verify.records import EpochLog, Recorder


@dataclass
class TrainerSource:
    """Where a trainer takes its inputs from and puts its outputs (all sealed, all by id)."""

    store_url: str
    job_id: int
    key_file: str
    passphrase: str | None
    client_public: str  # hex X25519 key of the client (it seals the pipeline's data key)
    server_public: str  # hex X25519 key of the trainer's parameter server (it seals the stage keys)
    data_key_cid: str
    trainer_keys_cid: str
    data_cid: str
    data_digest: str
    generation: int = 0  # how many trainers held this slot before (the spec's attacks are its first trainer's)
    peers: tuple = ()  # the addresses of the pipeline's trainers, stage by stage (who signs what a stage receives)
    peer_publics: tuple = ()  # their X25519 keys (hex) as published on the market: the links' key exchange


@dataclass
class StageArgs:
    spec: JobSpec
    plan: StagePlan
    pipeline: int
    stage: int
    port: int
    source: TrainerSource | None = None
    collusion_dir: str | None = None  # the spec's colluding attackers swap honest updates here


class _Trainer:
    """A trainer's keys and store, opened inside its stage process.

    It holds its own key and what was sealed to it: its pipeline's data key and
    its own stage's keys, nothing of other stages or pipelines, nor the validation set's.
    """

    def __init__(self, src: TrainerSource, pipeline: int, stage: int):
        from tdml_core.chain.market import Kind
        from tdml_core.identity import Identity, open_secrets
        from tdml_core.protocol.keys import JobKeys, role_of
        from tdml_core.storage import open_store

        self.src, self.pipeline, self.stage = src, pipeline, stage
        self.store = open_store(src.store_url)
        me = self.identity = Identity.load(src.key_file, src.passphrase)
        self.sign_key = bytes(me.account.key)  # signs the digests of the messages it sends its neighbours
        held = {}
        for sender, cid, role in ((src.client_public, src.data_key_cid, "data-key"),
                                  (src.server_public, src.trainer_keys_cid, "trainer-keys")):
            held.update(open_secrets(me, bytes.fromhex(sender), src.job_id, role, bytes(self.store.get(cid))))
        self.keys = JobKeys.from_doc(held)
        self.kinds, self.role_of = Kind, role_of

    def _seal_args(self, kind, pipeline: int, stage: int) -> tuple[bytes, str]:
        return self.keys.for_kind(kind, pipeline, stage), self.role_of(kind, pipeline, stage)

    def shard(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        key, role = self._seal_args(self.kinds.DATA, self.pipeline, 0)
        doc = get_state(self.store, key, self.src.job_id, role, self.src.data_cid, self.src.data_digest)
        return doc["x"], doc["y"], int(doc["num_classes"])

    def stage_input(self, ref: dict) -> dict:
        key, role = self._seal_args(self.kinds.STAGE, 0, self.stage)
        return get_state(self.store, key, self.src.job_id, role, ref["cid"], ref["digest"])

    def put(self, kind_name: str, state: dict) -> dict:
        key, role = self._seal_args(self.kinds[kind_name.upper()], self.pipeline, self.stage)
        cid, dig = put_state(self.store, key, self.src.job_id, role, state)
        return {"cid": cid, "digest": dig}

    def put_reveal(self, raw: bytes) -> dict:
        """A challenge's answer, sealed with the key of this trainer's weights (its referee and the client hold it)."""
        from tdml_core.artifacts import put_sealed
        from tdml_core.protocol.keys import reveal_role

        key = self.keys.for_kind(self.kinds.WEIGHTS, self.pipeline, self.stage)
        cid, dig = put_sealed(self.store, key, self.src.job_id, reveal_role(self.pipeline, self.stage), raw)
        return {"cid": cid, "digest": dig, "bytes": len(raw)}


def _as_tuple(v):
    return v if isinstance(v, tuple) else (v,)


def _detached(v):
    if isinstance(v, tuple):
        return tuple(_detached(x) for x in v)
    return v.detach().requires_grad_(v.requires_grad)


def _boundary_values(stages, example):
    """Example values entering and leaving each stage (shapes for the p2p buffers).

    Runs with autograd on, since whether a value requires grad tells the stage
    whether a gradient comes back for it; then restores every stage's state,
    because traced stages always run in training mode and would move
    BatchNorm's running statistics.
    """
    saved = [copy.deepcopy(m.state_dict()) for m in stages]
    values = [example]
    v = example
    for m in stages:
        v = _detached(m(*_as_tuple(v)))
        values.append(v)
    for m, s in zip(stages, saved):
        m.load_state_dict(s)
    return values


def stage_device(pipeline: int, stage: int, n_stages: int) -> torch.device:
    """A GPU of its own for every stage of a pipeline when there are enough, else the CPU.

    NCCL refuses two ranks of one group on the same GPU, so a pipeline goes to GPUs
    only when each of its stages can have one; pipelines may share GPUs.
    """
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus >= n_stages:
        return torch.device("cuda", (pipeline * n_stages + stage) % n_gpus)
    return torch.device("cpu")


class StageProcess:
    def __init__(self, args: StageArgs):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        spec, plan = args.spec, args.plan
        self.args = args
        self.n_stages = plan.n_stages
        self.is_first = args.stage == 0
        self.is_last = args.stage == plan.n_stages - 1
        self.device = stage_device(args.pipeline, args.stage, plan.n_stages)
        self.trainer = _Trainer(args.source, args.pipeline, args.stage) if args.source else None
        if self.trainer:  # the shard comes from the store; the model's shape from the spec
            self.x, self.y, num_classes = self.trainer.shard()
            example = self.x[: spec.microbatch_size].clone()
            model = model_for(spec, num_classes, example)
        else:
            ds, model = load_job(spec)
            num_classes = ds.num_classes
            self.x, self.y = shard(ds, args.pipeline, spec.data_parallel, spec.seed)
            example = example_microbatch(ds, spec)
        stages = [m.to(self.device) for m in split_model(model, plan, example)]
        values = _boundary_values(stages, example.to(self.device))
        self.module = stages[args.stage]
        self.num_classes = int(num_classes)
        self.links = self._links() if spec.protocol.links == "sealed" and plan.n_stages > 1 else None
        stage = (partial(link.SealedStage, links=self.links) if self.links else PipelineStage)(
            self.module,
            args.stage,
            plan.n_stages,
            self.device,
            input_args=_as_tuple(values[args.stage]),
            output_args=values[args.stage + 1],
        )
        schedule_cls = Schedule1F1B if spec.schedule == "1f1b" else ScheduleGPipe
        self.schedule = schedule_cls(stage, spec.microbatches, loss_fn=F.cross_entropy)
        self.optimizer = make_optimizer(spec, self.module.parameters())
        # a dishonest trainer's hooks first, then the records', so the records hold what was really sent
        self.tamper = attacks.Tamper(self.module, first=self.is_first, last=self.is_last)
        self.recorder = Recorder(self.module, first=self.is_first, last=self.is_last)
        self.tamper.install_late(self.module)  # a forger that keeps honest records acts after them
        if self.trainer:
            self.sign_key, self.peers = self.trainer.sign_key, list(self.trainer.src.peers)
        else:  # a run without identities: each slot signs with a key of its own, known to all
            self.sign_key = signing.slot_key(spec.seed, args.pipeline, args.stage)
            self.peers = [signing.slot_address(spec.seed, args.pipeline, s) for s in range(plan.n_stages)]
        self.log: EpochLog | None = None  # the last epoch's records, kept for its challenges
        self.log_epoch: int | None = None
        self._last_update: dict | None = None  # what a free rider sends back instead of working
        if self.trainer and self.trainer.src.generation > 0:
            self._leave_collusion()
        self.generation = 0  # without a trainer source: how many times ``replace`` gave the slot a new trainer

    def _links(self) -> "link.Links":
        """This stage's sealed links: keys from the X25519 exchange with each neighbour (or from the seed)."""
        a, n = self.args, self.args.plan.n_stages
        directions = link.neighbour_directions(a.stage, n)
        if self.trainer:
            from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

            from tdml_core.crypto import derive_key

            src, me = self.trainer.src, self.trainer.identity
            job = str(src.job_id)
            keys = {(i, j): derive_key(me.x25519, X25519PublicKey.from_public_bytes(
                        bytes.fromhex(src.peer_publics[j if i == a.stage else i])), link.link_context(job, a.pipeline, i, j))
                    for i, j in directions}
        else:
            job = a.spec.name
            keys = {(i, j): link.seed_link_key(a.spec.seed, job, a.pipeline, i, j) for i, j in directions}
        return link.Links(job, a.pipeline, a.stage, keys)

    def reset(self, attack_specs: list, collusion_dir: str | None) -> None:
        """A new run on the same process: the given attacks, the slot's first trainer, a fresh optimizer."""
        spec = self.args.spec.model_copy(update={"attacks": list(attack_specs)})
        self.args = with_fields(self.args, spec=spec, collusion_dir=collusion_dir)
        self.generation = 0
        self.optimizer = make_optimizer(spec, self.module.parameters())
        self._forget()

    def replace(self) -> None:
        """A new trainer holds the slot: none of the spec's attacks are its own, and its optimizer starts empty."""
        self._leave_collusion()
        self.generation += 1
        self.optimizer = make_optimizer(self.args.spec, self.module.parameters())
        self._forget()

    def _forget(self) -> None:
        """What the slot's previous trainer (or run) kept: its records, last update and last messages."""
        self.log, self._last_update = None, None
        self.tamper.forget()

    def _leave_collusion(self) -> None:
        """The slot's first trainer is gone: if it colluded, its group stops waiting for its updates."""
        a = self.args
        mine = attacks.attack_of(a.spec, a.pipeline, a.stage)
        if mine is not None and mine.kind in attacks.COLLUDING and a.collusion_dir:
            attacks.Collusion(a.collusion_dir, 0).leave(a.stage, a.pipeline)

    def _step(self, xb, yb) -> list[torch.Tensor]:
        """One pipelined forward/backward of a batch; the microbatch losses on the last stage."""
        losses: list[torch.Tensor] = []
        args = (xb.to(self.device),) if self.is_first else ()
        kwargs = {"target": yb.to(self.device), "losses": losses} if self.is_last else {}
        self.schedule.step(*args, **kwargs)
        return losses

    def train_epoch(self, epoch: int, start: dict) -> tuple[dict | None, dict]:
        """Train one epoch from ``start`` (weights, or under the protocol a {cid, digest} to fetch).

        Returns (state, stats); a trainer returns no state but the ids and digests
        of its weights and epoch gradient, already in the store.
        """
        spec, a = self.args.spec, self.args
        cpu0 = time.process_time()
        if self.trainer:
            start = self.trainer.stage_input(start)
        self.module.load_state_dict(start)
        self.module.train()
        first = (self.trainer.src.generation if self.trainer else self.generation) == 0
        attack = attacks.attack_of(spec, a.pipeline, a.stage, epoch) if first else None
        start = {k: v.detach().cpu().clone() for k, v in start.items()}
        flip = attack is not None and attack.kind == "label_flip" and self.is_last
        todo = round_batches(spec, self.x, self.y, epoch, a.pipeline)  # ``epoch`` is the protocol's round
        n_batches = len(todo)
        # a stable seed (a string's hash() changes from process to process): an attack is the same in every run
        gen = torch.Generator().manual_seed(hash((spec.seed, epoch, a.pipeline, a.stage, 0x7A3)) % 2**63)
        self.tamper.begin_epoch(attack, n_batches, gen)
        log = EpochLog(spec.verification.checkpoint_every) if spec.verification.enabled else None
        self._signed: dict[int, list[bytes]] = {}  # per neighbour: the hashes of what this epoch sent it
        loss_sum, n = 0.0, 0
        # only a trainer commits its epoch gradient (detection reads it); the dry run skips the sum
        grad_sum = {name: torch.zeros_like(p) for name, p in self.module.named_parameters()} if self.trainer else None
        for t, (xb, yb) in enumerate(todo):
            self.optimizer.zero_grad(set_to_none=True)
            target = (self.num_classes - 1 - yb) if flip else yb
            skip = self.tamper.begin_step(t)
            if log is not None:
                self.recorder.begin(log, t, self.module, self.optimizer, target if self.is_last else None,
                                    spec.microbatches)
            losses = self._step(xb, target)
            if log is not None:
                self._sign_step(log, self.recorder.end(), epoch, t)
            self.tamper.end_step()
            if grad_sum is not None:
                with torch.no_grad():
                    for name, p in self.module.named_parameters():
                        if p.grad is not None:
                            grad_sum[name] += p.grad
            if not skip:
                self.optimizer.step()
            if losses:
                loss_sum += float(torch.stack([loss.detach() for loss in losses]).mean())
            n += 1
        if log is not None and self.n_stages > 1:
            self._exchange_signatures(log, epoch)
        state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        stats = {"batches": n, "train_loss": (loss_sum / n) if (self.is_last and n) else None}
        if attack is not None and attack.kind == "free_rider":
            state = attacks.free_ride(start, state, self._last_update, self.tamper.scale, gen)
        elif attack is not None and attack.kind not in attacks.COMPUTE:
            state, grad_sum = self._attack(attack, epoch, start, state, grad_sum)
        planned = attacks.attack_of(spec, a.pipeline, a.stage) if first else None
        if attack is None and planned is not None and planned.kind == "free_rider":  # kept for its free ride
            self._last_update = attacks.update(start, state)
        if log is not None:
            c0 = time.process_time()
            stats["record"] = log.close(state)
            stats["commit_cpu_s"] = time.process_time() - c0  # hashing the records into their root
            stats["record_bytes"] = log.nbytes()
            stats["record_cpu_s"] = log.cpu_s  # recording, hashing and signing
        self.log, self.log_epoch = log, epoch
        stats["cpu_s"] = time.process_time() - cpu0
        if not self.trainer:
            return state, stats
        stats["weights"] = self.trainer.put("weights", state)
        stats["grad"] = self.trainer.put("grad", {k: v.cpu() for k, v in grad_sum.items()})
        return None, stats

    def _sign_step(self, log: EpochLog, step, epoch: int, t: int) -> None:
        """Hash the digests of what this step sent each neighbour (signed once, at the epoch's end)."""
        a, n = self.args, self.args.plan.n_stages
        c0 = time.thread_time()
        sent = self.tamper.sent_digests() or {}
        for peer, kind, name in ((a.stage + 1, signing.ACTIVATIONS, "outputs"),
                                 (a.stage - 1, signing.GRADIENTS, "grads_out")):
            if 0 <= peer < n:
                h = signing.message_hash(a.pipeline, epoch, t, kind, a.stage, sent.get(name, step.digests(name)))
                self._signed.setdefault(peer, []).append(h)
        log.cpu_s += time.thread_time() - c0

    def _exchange_signatures(self, log: EpochLog, epoch: int) -> None:
        """Give each neighbour one signature over this epoch's messages to it; check and keep what it gave us.

        One message each way per neighbour, before anyone commits: the signature of the root over the step
        hashes, then the step hashes. A receiver whose own hashes of what arrived give the signed root keeps
        the signature, the root and each step's path; any other receiver refuses the epoch, naming the
        sender and the first step that differs.
        """
        a, n, steps = self.args, self.args.plan.n_stages, len(log.steps)
        c0 = time.thread_time()
        works, bufs = [], {}
        size = signing.SIGNATURE_BYTES + steps * signing.HASH_BYTES
        for peer in (a.stage - 1, a.stage + 1):
            if 0 <= peer < n:
                hashes = self._signed.get(peer, [])
                kind = signing.ACTIVATIONS if peer > a.stage else signing.GRADIENTS
                root = merkle.root(hashes) if hashes else b""
                sig = signing.sign(self.sign_key, signing.epoch_hash(a.pipeline, epoch, kind, a.stage, root, steps)) \
                    if hashes else b""
                mine = (sig + b"".join(hashes)).ljust(size, b"\0")[:size]
                works.append(dist.isend(torch.frombuffer(bytearray(mine), dtype=torch.uint8).to(self.device),
                                        peer, tag=7))
                bufs[peer] = torch.zeros(size, dtype=torch.uint8, device=self.device)
                works.append(dist.irecv(bufs[peer], peer, tag=7))
        for w in works:
            w.wait()
        for peer, buf in bufs.items():
            kind, name, field = ((signing.ACTIVATIONS, "inputs", "sig_in") if peer < a.stage
                                 else (signing.GRADIENTS, "grads_in", "sig_grads"))
            raw = bytes(buf.cpu().numpy())
            sig, theirs = raw[:signing.SIGNATURE_BYTES], raw[signing.SIGNATURE_BYTES:]
            ours = [signing.message_hash(a.pipeline, epoch, t, kind, peer, step.digests(name))
                    for t, step in enumerate(log.steps)]
            root, paths = merkle.all_proofs(ours) if ours else (b"", [])
            if signing.signer(signing.epoch_hash(a.pipeline, epoch, kind, peer, root, steps), sig) != self.peers[peer]:
                bad = next((t for t, h in enumerate(ours)
                            if theirs[t * signing.HASH_BYTES:(t + 1) * signing.HASH_BYTES] != h), None)
                where = f"step {bad}: " if bad is not None else ""
                raise RuntimeError(f"{where}the {kind} from {a.pipeline}/{peer} do not carry its trainer's "
                                   f"signature over what arrived; refusing them")
            evidence = {"sig": sig.hex(), "root": root.hex()}
            for step, path in zip(log.steps, paths):
                setattr(step, field, evidence)
                step.paths[field] = [h.hex() for h in path]
        log.cpu_s += time.thread_time() - c0

    def _attack(self, attack, epoch: int, start: dict, state: dict, grad_sum: dict | None):
        """This trainer cheats: it commits start + the attack's update, and a gradient that agrees with it."""
        spec, a = self.args.spec, self.args
        honest = attacks.update(start, state)
        peers = [honest]
        if attack.kind in attacks.COLLUDING:
            group = attacks.colluders(spec, attack, epoch)
            if len(group) > 1:
                peers = attacks.Collusion(a.collusion_dir, spec.stage_timeout_s / 2).share(
                    epoch, a.stage, a.pipeline, honest, group)
        gen = torch.Generator().manual_seed(hash((spec.seed, epoch, a.pipeline, a.stage)) % 2**63)
        bad = attacks.attacked(attack.kind, honest, scale=attack.scale, n_pipelines=spec.data_parallel,
                               peers=peers, generator=gen)
        out = {k: (start[k] + bad[k]).to(v.dtype) if k in bad else v for k, v in state.items()}
        if grad_sum is not None:
            grad_sum = attacks.forged_grad({k: g.cpu() for k, g in grad_sum.items()}, bad)
        return out, grad_sum

    def reveal(self, steps: list[int], epoch: int | None = None) -> dict:
        """Answer a challenge: the records and tensors of ``steps`` of the last epoch.

        A trainer puts them into the store and answers with their id and digest.
        """
        if self.log is None or (epoch is not None and epoch != self.log_epoch):
            raise RuntimeError(f"no records kept of epoch {epoch}: verification is off or that epoch did not run here")
        reveal = self.log.reveal(steps)
        if not self.trainer:
            return reveal
        from tdml_core.verify.records import reveal_bytes

        return self.trainer.put_reveal(reveal_bytes(reveal))

    def batch_grads(self, state: dict, xb, yb) -> tuple[dict, list[float]]:
        self.module.load_state_dict(state)
        self.optimizer.zero_grad(set_to_none=True)
        losses = self._step(xb, yb)
        grads = {n: p.grad.detach().cpu().clone() for n, p in self.module.named_parameters() if p.grad is not None}
        return grads, [float(loss) for loss in losses]


def stage_main(args: StageArgs, conn) -> None:
    """Entry point of a stage process."""
    torch.set_num_threads(1)
    quiet_trace_warnings()
    device = stage_device(args.pipeline, args.stage, args.plan.n_stages)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://127.0.0.1:{args.port}",
            rank=args.stage,
            world_size=args.plan.n_stages,
            timeout=timedelta(seconds=args.spec.stage_timeout_s),
        )
        proc = StageProcess(args)
        conn.send(("ready", sorted(proc.module.state_dict().keys())))
        while True:
            try:
                cmd, *payload = conn.recv()
            except EOFError:  # the coordinator is gone
                break
            if cmd == "stop":
                break
            if cmd == "epoch":
                conn.send(("trained", *proc.train_epoch(*payload)))
            elif cmd == "reveal":
                conn.send(("revealed", proc.reveal(*payload)))
            elif cmd == "grads":
                conn.send(("grads", *proc.batch_grads(*payload)))
            elif cmd == "reset":
                proc.reset(*payload)
                conn.send(("reset",))
            elif cmd == "replace":
                proc.replace()
                conn.send(("replaced",))
            else:
                raise ValueError(f"unknown command {cmd!r}")
    except Exception:
        try:
            conn.send(("error", traceback.format_exc()))
        finally:
            sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
