"""What a trainer records of its epoch, step by step, and commits as one Merkle root.

Leaf ``t`` (for each step t of N) holds the digests of what the stage had and
did at that step: its weights, optimizer state and random state before the step
(every ``checkpoint_every`` steps), what it received (the data batch's
microbatches on the first stage, the activations from upstream elsewhere; the
targets on the last stage; the gradients from downstream) and what it sent (its
activations downstream, its input gradients upstream). Leaf N holds the digest
of the committed end weights. The tensors themselves stay with the trainer
until a challenge asks for some steps (``EpochLog.reveal``).

Each tensor is hashed and copied once, when it is recorded: the Recorder
feeds its bytes to the step's digests and copies them into the log's spool
(memory chunks reused from epoch to epoch, or a temporary file), so the live
weights and optimizer state are never cloned and nothing is read again at the
epoch's end. Only the gradients are cloned until the end of their step,
because the order of their digest is known only then.

``Recorder`` fills a log from hooks on the stage module, so it records exactly
the tensors the pipeline schedule received and sent, after anything else the
process did to them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from tdml_core.artifacts import state_digest
from tdml_core.verify import merkle

Tensors = list[torch.Tensor]
FIELDS = ("inputs", "targets", "outputs", "grads_in", "grads_out")  # per-microbatch tensors of a step


def fast_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state's names, dtypes, shapes and raw bytes, hashed in place (no serialised copy)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def tensors_digest(tensors) -> str:
    return fast_digest({f"{i:04d}": t for i, t in enumerate(tensors)})


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's tensors as one flat state (for digests and for the verifier's replay)."""
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            out[f"{idx}.{name}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def load_optimizer_state(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v.clone()
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def leaf_bytes(leaf: dict) -> bytes:
    return json.dumps(leaf, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class StepData:
    """One step's tensors, kept by the trainer until its challenges are answered.

    The values are tensors or, when the ``Recorder`` spooled them, ``_Ref``s into
    the log's spool; then ``digests`` holds the leaf's digests, taken from the
    very bytes that were written.
    """

    weights: dict | None = None
    optim: dict | None = None
    rng: torch.Tensor | None = None
    inputs: list = field(default_factory=list)  # per microbatch: a tuple of tensors
    targets: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    grads_in: list = field(default_factory=list)
    grads_out: list = field(default_factory=list)
    digests: dict | None = None  # the leaf's digests, taken as the step was recorded

    def leaf(self, step: int) -> dict:
        if self.digests is not None:
            d = self.digests
            return {"step": step, "weights": d.get("weights"), "optim": d.get("optim"), "rng": d.get("rng"),
                    **{name: d.get(name) or None for name in FIELDS}}

        def per_mb(values):
            return [tensors_digest(v if isinstance(v, tuple) else (v,)) for v in values] if values else None

        return {
            "step": step,
            "weights": fast_digest(self.weights) if self.weights is not None else None,
            "optim": fast_digest(self.optim) if self.optim is not None else None,
            "rng": tensors_digest([self.rng]) if self.rng is not None else None,
            **{name: per_mb(getattr(self, name)) for name in FIELDS},
        }


class _Ref:
    """Where one recorded tensor's bytes lie in its log's spool."""

    __slots__ = ("chunk", "offset", "nbytes", "dtype", "shape")

    def __init__(self, chunk: int, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple):
        self.chunk, self.offset, self.nbytes, self.dtype, self.shape = chunk, offset, nbytes, dtype, shape


_FREE_CHUNKS: list[torch.Tensor] = []  # memory chunks of logs that are gone, for the next log to fill


class _Spool:
    """An append-only store of a log's raw tensor bytes.

    By default in memory chunks of ``CHUNK`` bytes: one copy per tensor into
    memory that is reused once the log is gone (a stage records epoch after
    epoch, and faulting in fresh pages costs more than the copy). With a
    ``directory``, in an unlinked temporary file there instead, so the process
    does not hold the records at all (on the file systems measured this costs
    2-8 times the CPU of the memory chunks: see bench/verification.py).
    """

    CHUNK = 32 << 20
    ALIGN = 64  # every tensor starts aligned, so its bytes can be viewed as any dtype

    def __init__(self, directory: str | None = None):
        self._file = tempfile.TemporaryFile(dir=directory, buffering=1 << 16) if directory else None
        self._chunks: list[torch.Tensor] = []
        self._used = 0  # bytes used of the last chunk
        self.size = 0  # bytes of the tensors put
        if self._file is None:  # the chunks go back to the pool when the log goes
            weakref.finalize(self, _FREE_CHUNKS.extend, self._chunks)

    def put(self, t: torch.Tensor, flat: torch.Tensor | None) -> _Ref:
        """Append ``t``'s bytes (``flat``: them as a contiguous uint8 CPU tensor, or None when it is empty)."""
        n = flat.numel() if flat is not None else 0
        self.size += n
        if n == 0:
            return _Ref(-1, 0, 0, t.dtype, tuple(t.shape))
        if self._file is not None:
            ref = _Ref(-1, self._file.tell(), n, t.dtype, tuple(t.shape))
            self._file.write(memoryview(flat.numpy()))
            return ref
        if not self._chunks or self._used + n > self._chunks[-1].numel():
            self._chunks.append(_take_chunk(max(self.CHUNK, n)))
            self._used = 0
        ref = _Ref(len(self._chunks) - 1, self._used, n, t.dtype, tuple(t.shape))
        self._chunks[-1][self._used:self._used + n].copy_(flat)
        self._used = -(-(self._used + n) // self.ALIGN) * self.ALIGN
        return ref

    def release(self) -> None:
        """Drop the bytes: the memory chunks go to the pool for the next log."""
        if self._file is not None:
            self._file.close()
        _FREE_CHUNKS.extend(self._chunks)
        self._chunks.clear()

    def get(self, ref: _Ref) -> torch.Tensor:
        """A fresh tensor with the bytes of ``ref``."""
        if ref.nbytes == 0:
            return torch.empty(ref.shape, dtype=ref.dtype)
        if self._file is None:
            raw = self._chunks[ref.chunk][ref.offset:ref.offset + ref.nbytes].clone()
        else:
            self._file.flush()
            raw = torch.empty(ref.nbytes, dtype=torch.uint8)
            view, done = memoryview(raw.numpy()), 0
            while done < ref.nbytes:
                n = os.preadv(self._file.fileno(), [view[done:]], ref.offset + done)
                if n <= 0:
                    raise OSError(f"the records' spool ended at byte {ref.offset + done}")
                done += n
        return raw.view(ref.dtype).reshape(ref.shape)


def _take_chunk(n: int) -> torch.Tensor:
    for i, c in enumerate(_FREE_CHUNKS):
        if c.numel() >= n:
            return _FREE_CHUNKS.pop(i)
    return torch.empty(n, dtype=torch.uint8)


def _raw(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``t`` on the CPU and contiguous, and its bytes as a flat uint8 tensor (no copy when it is already so)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return t, (t.reshape(-1).view(torch.uint8) if t.numel() else None)


def _put_state(spool: _Spool, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, _Ref]]:
    """``fast_digest(state)``, hashed from the same bytes that go into ``spool`` (one pass, no clone)."""
    h, refs = hashlib.sha256(), {}
    for name in sorted(state):
        t, flat = _raw(state[name])
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        if flat is not None:
            h.update(memoryview(flat.numpy()))
        refs[name] = spool.put(t, flat)
    return h.hexdigest(), refs


def _put_tensors(spool: _Spool, tensors) -> tuple[str, tuple]:
    """``tensors_digest(tensors)`` and the tensors' refs, as ``_put_state`` does it."""
    digest, refs = _put_state(spool, {f"{i:04d}": t for i, t in enumerate(tensors)})
    return digest, tuple(refs[f"{i:04d}"] for i in range(len(refs)))


class EpochLog:
    """A trainer's records of one epoch: leaves, their Merkle root, and the tensors to reveal."""

    def __init__(self, checkpoint_every: int = 1, spool_dir: str | None = None):
        self.checkpoint_every = checkpoint_every
        self.steps: list[StepData] = []
        self.leaves: list[dict] = []
        self.end_weights: dict | None = None
        self.spool_dir = spool_dir  # a directory to spool the recorded tensors to; None: keep them in memory
        self._spool: _Spool | None = None
        self.released = False

    @property
    def spool(self) -> _Spool:
        if self._spool is None:
            self._spool = _Spool(self.spool_dir)
        return self._spool

    def release(self) -> None:
        """Drop the recorded tensors (the leaves and the root stay); a reveal fails from now on."""
        self.released = True
        if self._spool is not None:
            self._spool.release()

    def _load(self, v, cache: dict):
        """``v`` with every spooled tensor read back (each once per ``cache``)."""
        if isinstance(v, _Ref):
            if id(v) not in cache:  # the refs live as long as the log, so their ids are theirs
                cache[id(v)] = self._spool.get(v)
            return cache[id(v)]
        if isinstance(v, dict):
            return {k: self._load(x, cache) for k, x in v.items()}
        if isinstance(v, tuple):
            return tuple(self._load(x, cache) for x in v)
        if isinstance(v, list):
            return [self._load(x, cache) for x in v]
        return v

    def close(self, end_weights: dict) -> dict:
        """The epoch is over and ``end_weights`` are what the trainer commits: the commitment."""
        self.end_weights = end_weights
        self.leaves = [s.leaf(t) for t, s in enumerate(self.steps)]
        self.leaves.append({"step": len(self.steps), "weights": state_digest(end_weights)})
        self._hashes = [merkle.leaf_hash(leaf_bytes(leaf)) for leaf in self.leaves]
        return {"root": merkle.root(self._hashes).hex(), "leaves": len(self.leaves)}

    def segment(self, step: int) -> tuple[int, int]:
        """The steps [start, end) a check of ``step`` replays: from its checkpoint to the next."""
        start = step - step % self.checkpoint_every
        return start, min(start + self.checkpoint_every, len(self.steps))

    def reveal(self, steps: list[int]) -> dict:
        """What a challenge of ``steps`` gets: their segments' leaves with proofs, and the tensors to replay them."""
        if self.released:
            raise RuntimeError("these records were released: a later epoch has been recorded since")
        out: dict[int, dict] = {}
        cache: dict = {}
        for step in steps:
            start, end = self.segment(step)
            for t in range(start, end + 1):
                entry = out.setdefault(t, {"leaf": self.leaves[t],
                                           "proof": [h.hex() for h in merkle.proof(self._hashes, t)]})
                if t == end:
                    entry["weights"] = (self.end_weights if t == len(self.steps)
                                        else self._load(self.steps[t].weights, cache))
                    continue
                s = self.steps[t]
                if t == start:
                    entry.update(self._load({"weights": s.weights, "optim": s.optim, "rng": s.rng}, cache))
                entry.update({name: self._load(list(getattr(s, name)), cache) for name in FIELDS})
        return {"leaves": len(self.leaves), "steps": out}

    def nbytes(self) -> int:
        """Bytes of tensors this log keeps (what the trainer stores for an epoch's challenges)."""
        return sum(tensor_bytes(getattr(s, n)) for s in self.steps for n in ("weights", "optim", "rng", *FIELDS))


def tensor_bytes(v) -> int:
    """Bytes of the tensors in ``v``, however nested in dicts, lists and tuples."""
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, _Ref):  # a spooled tensor: kept on disk
        return v.nbytes
    if isinstance(v, dict):
        return sum(tensor_bytes(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return sum(tensor_bytes(x) for x in v)
    return 0


class Recorder:
    """Hooks on a stage module that fill the current step of an ``EpochLog``.

    Installed once; idle outside ``begin``/``end``. Hooks installed on the module
    before these (a dishonest trainer's) act first, so the records hold what was
    really sent.

    A stage records its epochs one after another and keeps only the last one's
    records for challenges (a challenge names its epoch, and once the stage has
    begun another epoch the one before cannot be challenged any more), so when
    ``begin`` starts a new log it releases the one it filled before: the new
    epoch's records then reuse that memory instead of faulting in fresh pages,
    and a trainer holds one epoch of records, not two.
    """

    def __init__(self, module: nn.Module, *, first: bool, last: bool):
        self.first, self.last = first, last
        self.log: EpochLog | None = None
        self.step: StepData | None = None
        self._filled: weakref.ref | None = None  # the log filled before the current one
        self._handles: list = []
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def begin(self, log: EpochLog, t: int, module: nn.Module, optimizer: torch.optim.Optimizer,
              targets: torch.Tensor | None, microbatches: int) -> None:
        before = self._filled() if self._filled is not None else None
        if before is not None and before is not log:
            before.release()
        self._filled = weakref.ref(log)
        self.log, self.step = log, StepData(digests={name: [] for name in FIELDS})
        spool, d = log.spool, self.step.digests
        if t % log.checkpoint_every == 0:
            # hashed and written straight from the live tensors: nothing changes them before the step runs
            d["weights"], self.step.weights = _put_state(spool, module.state_dict())
            d["optim"], self.step.optim = _put_state(spool, optimizer_state(optimizer))
            d["rng"], (self.step.rng,) = _put_tensors(spool, [torch.get_rng_state()])
        if self.last and targets is not None:
            for y in targets.tensor_split(microbatches):
                self._put("targets", (y,), single=True)

    def _put(self, name: str, tensors, single: bool = False) -> None:
        """One microbatch's tensors of field ``name``: their digest into the leaf, their bytes into the spool."""
        digest, refs = _put_tensors(self.log.spool, tensors)
        self.step.digests[name].append(digest)
        getattr(self.step, name).append(refs[0] if single else refs)

    def end(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name in ("grads_in", "grads_out"):  # the gradients that really flowed, per microbatch
            flowed = [tuple(g for g in gs if g is not None) for gs in getattr(self.step, name)]
            setattr(self.step, name, [])
            for gs in flowed:
                self._put(name, gs)
        self.log.steps.append(self.step)
        self.log, self.step = None, None

    def _pre(self, module, args):
        if self.step is None:
            return
        i = len(self.step.inputs)
        # written out now: the schedule receives into the same buffers every step
        self._put("inputs", tuple(args))
        if not self.first:
            self.step.grads_out.append([None] * len(args))
            for j, a in enumerate(args):
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    self._handles.append(a.register_hook(self._grad_out_hook(i, j)))

    # a gradient is cloned and hashed at the step's end: which of them flow (and so their order in the
    # digest) is known only then, and a received one lies in a buffer the schedule reuses
    def _grad_out_hook(self, i: int, j: int):
        def hook(g):
            self.step.grads_out[i][j] = g.detach().cpu().clone()
        return hook

    def _post(self, module, args, output):
        if self.step is None or self.last:
            return
        i = len(self.step.outputs)
        outs = output if isinstance(output, tuple) else (output,)
        # an input passed straight through (a skip connection) gets its own node, so the hook below
        # sees the gradient that came back for this output, not the input's total
        passed = {id(a) for a in args if isinstance(a, torch.Tensor)}
        through = any(id(o) in passed for o in outs)
        if through:
            outs = tuple(o.view_as(o) if id(o) in passed else o for o in outs)
        self._put("outputs", outs)
        self.step.grads_in.append([None] * len(outs))
        for j, o in enumerate(outs):
            if isinstance(o, torch.Tensor) and o.requires_grad:
                self._handles.append(o.register_hook(self._grad_in_hook(i, j)))
        if through:
            return outs if isinstance(output, tuple) else outs[0]
        return None

    def _grad_in_hook(self, i: int, j: int):
        def hook(g):
            self.step.grads_in[i][j] = g.detach().cpu().clone()
        return hook


# -- a reveal as bytes: what a trainer puts into the store to answer a challenge ----------------------------------
def _pack(v, tensors: dict):
    if isinstance(v, torch.Tensor):
        name = f"{len(tensors):06d}"
        tensors[name] = v
        return {"$t": name}
    if isinstance(v, dict):
        return {"$d": [[str(k), _pack(x, tensors)] for k, x in v.items()]}
    if isinstance(v, tuple):
        return {"$tuple": [_pack(x, tensors) for x in v]}
    if isinstance(v, list):
        return [_pack(x, tensors) for x in v]
    return v


def _unpack(v, tensors: dict):
    if isinstance(v, list):
        return [_unpack(x, tensors) for x in v]
    if not isinstance(v, dict):
        return v
    if "$t" in v:
        return tensors[v["$t"]]
    if "$tuple" in v:
        return tuple(_unpack(x, tensors) for x in v["$tuple"])
    return {k: _unpack(x, tensors) for k, x in v["$d"]}


def reveal_bytes(reveal: dict) -> bytes:
    """A reveal (``EpochLog.reveal``'s answer) in the artifacts' pickle-free state format."""
    from tdml_core.artifacts import state_bytes

    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_pack(reveal, tensors), separators=(",", ":")).encode()
    tensors["skeleton"] = torch.frombuffer(bytearray(skeleton), dtype=torch.uint8)
    return state_bytes(tensors)


def reveal_from_bytes(data: bytes) -> dict:
    """The reveal that ``reveal_bytes`` wrote (step numbers back as ints)."""
    from tdml_core.artifacts import state_from_bytes

    tensors = state_from_bytes(data)
    skeleton = tensors.pop("skeleton")
    reveal = _unpack(json.loads(bytes(skeleton.numpy())), tensors)
    reveal["steps"] = {int(k): v for k, v in reveal.get("steps", {}).items()}
    return reveal
