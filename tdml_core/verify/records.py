"""What a trainer records of its epoch, step by step, and commits as one Merkle root.

Leaf ``t`` (for each step t of N) holds the digests of what the stage had and
did at that step: its weights, optimizer state and random state before the step
(every ``checkpoint_every`` steps), what it received (the data batch's
microbatches on the first stage, the activations from upstream elsewhere; the
targets on the last stage; the gradients from downstream), what it sent (its
activations downstream, its input gradients upstream), and the signatures its
neighbours gave for the epoch's messages (``verify/signing.py``). Leaf N holds the
digest of the committed end weights. The tensors themselves stay with the trainer
until a challenge asks for some steps (``EpochLog.reveal``).

``Recorder`` fills a log from hooks on the stage module, so it records exactly
the tensors the pipeline schedule received and sent, after anything else the
process did to them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch
from blake3 import blake3
from torch import nn

from tdml_core.artifacts import state_digest
from tdml_core.verify import merkle

Tensors = list[torch.Tensor]
# the records' own CPU: this thread's (what the hooks spend), not the process's, whose other threads move messages
_clock = time.thread_time
FIELDS = ("inputs", "targets", "outputs", "grads_in", "grads_out")  # per-microbatch tensors of a step


def _feed(h, t: torch.Tensor) -> None:
    """One tensor into a hasher: its dtype and shape, then its raw bytes in place (no serialised copy)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)};".encode())
    if t.numel():
        try:
            h.update(memoryview(t.numpy()).cast("B"))
        except TypeError:  # a dtype numpy has not (bfloat16): its bytes as uint8
            h.update(t.reshape(-1).view(torch.uint8).numpy())


def fast_digest(state: dict[str, torch.Tensor]) -> str:
    """BLAKE3 over a state's names, dtypes, shapes and raw bytes, hashed in place.

    BLAKE3 hashes 32 KiB four times as fast as SHA-256 here (5 µs against 20 µs), and every step
    hashes what it sent and received: the records' cost is mostly hashing.
    """
    h = blake3()
    for name in sorted(state):
        h.update(f"{name}|".encode())
        _feed(h, state[name])
    return h.hexdigest()


def tensors_digest(tensors) -> str:
    """The digest of a sequence of tensors (one microbatch's message), with as little overhead as a call can
    have: a step digests a dozen of them."""
    h = blake3()
    for t in tensors:
        _feed(h, t)
    return h.hexdigest()


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
    """One step's tensors, kept by the trainer until its challenges are answered."""

    weights: dict | None = None
    optim: dict | None = None
    rng: torch.Tensor | None = None
    inputs: list = field(default_factory=list)  # per microbatch: a tuple of tensors
    targets: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    grads_in: list = field(default_factory=list)
    grads_out: list = field(default_factory=list)
    # the upstream stage's signature over the activations received, the downstream one's over the gradients:
    # {"sig", "root"} (hex), the sender's signature of the epoch's root over its step hashes; and this
    # step's Merkle path under that root (hex), which goes with the step when it is revealed
    sig_in: dict | None = None
    sig_grads: dict | None = None
    paths: dict = field(default_factory=dict)
    _digests: dict = field(default_factory=dict)

    def digests(self, name: str) -> list[str] | None:
        """One digest per microbatch of field ``name`` (computed once: signatures and the leaf share it)."""
        if name not in self._digests:
            values = getattr(self, name)
            self._digests[name] = [tensors_digest(v if isinstance(v, tuple) else (v,)) for v in values] \
                if values else None
        return self._digests[name]

    def leaf(self, step: int) -> dict:
        return {
            "step": step,
            "weights": fast_digest(self.weights) if self.weights is not None else None,
            "optim": fast_digest(self.optim) if self.optim is not None else None,
            "rng": tensors_digest([self.rng]) if self.rng is not None else None,
            **{name: self.digests(name) for name in FIELDS},
            "sig_in": self.sig_in,
            "sig_grads": self.sig_grads,
        }


class EpochLog:
    """A trainer's records of one epoch: leaves, their Merkle root, and the tensors to reveal."""

    def __init__(self, checkpoint_every: int = 1):
        self.checkpoint_every = checkpoint_every
        self.steps: list[StepData] = []
        self.leaves: list[dict] = []
        self.end_weights: dict | None = None
        self.cpu_s = 0.0  # CPU time spent recording, hashing and signing (the records' own cost)

    def close(self, end_weights: dict) -> dict:
        """The epoch is over and ``end_weights`` are what the trainer commits: the commitment."""
        self.end_weights = end_weights
        c0 = _clock()
        self.leaves = [s.leaf(t) for t, s in enumerate(self.steps)]
        self.leaves.append({"step": len(self.steps), "weights": state_digest(end_weights)})
        self._hashes = [merkle.leaf_hash(leaf_bytes(leaf)) for leaf in self.leaves]
        root = merkle.root(self._hashes).hex()
        self.cpu_s += _clock() - c0
        return {"root": root, "leaves": len(self.leaves)}

    def segment(self, step: int) -> tuple[int, int]:
        """The steps [start, end) a check of ``step`` replays: from its checkpoint to the next."""
        start = step - step % self.checkpoint_every
        return start, min(start + self.checkpoint_every, len(self.steps))

    def reveal(self, steps: list[int]) -> dict:
        """What a challenge of ``steps`` gets: their segments' leaves with proofs, and the tensors to replay them."""
        out: dict[int, dict] = {}
        for step in steps:
            start, end = self.segment(step)
            for t in range(start, end + 1):
                entry = out.setdefault(t, {"leaf": self.leaves[t],
                                           "proof": [h.hex() for h in merkle.proof(self._hashes, t)]})
                if t == end:
                    entry["weights"] = self.end_weights if t == len(self.steps) else self.steps[t].weights
                    continue
                s = self.steps[t]
                if t == start:
                    entry.update(weights=s.weights, optim=s.optim, rng=s.rng)
                entry.update({name: list(getattr(s, name)) for name in FIELDS})
                entry["paths"] = dict(s.paths)
        return {"leaves": len(self.leaves), "steps": out}

    def nbytes(self) -> int:
        """Bytes of tensors this log keeps (what the trainer stores for an epoch's challenges)."""
        return sum(tensor_bytes(getattr(s, n)) for s in self.steps for n in ("weights", "optim", "rng", *FIELDS))


def tensor_bytes(v) -> int:
    """Bytes of the tensors in ``v``, however nested in dicts, lists and tuples."""
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, dict):
        return sum(tensor_bytes(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return sum(tensor_bytes(x) for x in v)
    return 0


def _clone(v):
    if isinstance(v, tuple):
        return tuple(_clone(x) for x in v)
    return v.detach().cpu().clone()


class Recorder:
    """Hooks on a stage module that fill the current step of an ``EpochLog``.

    Installed once; idle outside ``begin``/``end``. Hooks installed on the module
    before these (a dishonest trainer's) act first, so the records hold what was
    really sent.
    """

    def __init__(self, module: nn.Module, *, first: bool, last: bool):
        self.first, self.last = first, last
        self.log: EpochLog | None = None
        self.step: StepData | None = None
        self._handles: list = []
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def begin(self, log: EpochLog, t: int, module: nn.Module, optimizer: torch.optim.Optimizer,
              targets: torch.Tensor | None, microbatches: int) -> None:
        c0 = _clock()
        self.log, self.step = log, StepData()
        if t % log.checkpoint_every == 0:
            self.step.weights = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            self.step.optim = {k: v.detach().cpu().clone() for k, v in optimizer_state(optimizer).items()}
            self.step.rng = torch.get_rng_state()
        if self.last and targets is not None:
            self.step.targets = [y.clone() for y in targets.tensor_split(microbatches)]
        log.cpu_s += _clock() - c0

    def end(self) -> StepData:
        """The step is over: its record, with its messages' digests (for the signatures and the leaf)."""
        c0 = _clock()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name in ("grads_in", "grads_out"):  # the gradients that really flowed, per microbatch
            setattr(self.step, name, [tuple(g for g in gs if g is not None) for gs in getattr(self.step, name)])
        self.log.steps.append(self.step)
        step, self.step = self.step, None
        for name in FIELDS:
            step.digests(name)
        self.log.cpu_s += _clock() - c0
        return step

    def _pre(self, module, args):
        if self.step is None:
            return
        c0 = _clock()
        i = len(self.step.inputs)
        self.step.inputs.append(_clone(tuple(args)))
        if not self.first:
            self.step.grads_out.append([None] * len(args))
            for j, a in enumerate(args):
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    self._handles.append(a.register_hook(self._grad_out_hook(i, j)))
        self.log.cpu_s += _clock() - c0

    def _grad_out_hook(self, i: int, j: int):
        def hook(g):
            c0 = _clock()
            self.step.grads_out[i][j] = g.detach().cpu().clone()
            self.log.cpu_s += _clock() - c0
        return hook

    def _post(self, module, args, output):
        if self.step is None or self.last:
            return
        c0 = _clock()
        i = len(self.step.outputs)
        outs = output if isinstance(output, tuple) else (output,)
        # an input passed straight through (a skip connection) gets its own node, so the hook below
        # sees the gradient that came back for this output, not the input's total
        passed = {id(a) for a in args if isinstance(a, torch.Tensor)}
        through = any(id(o) in passed for o in outs)
        if through:
            outs = tuple(o.view_as(o) if id(o) in passed else o for o in outs)
        self.step.outputs.append(_clone(outs))
        self.step.grads_in.append([None] * len(outs))
        for j, o in enumerate(outs):
            if isinstance(o, torch.Tensor) and o.requires_grad:
                self._handles.append(o.register_hook(self._grad_in_hook(i, j)))
        self.log.cpu_s += _clock() - c0
        if through:
            return outs if isinstance(output, tuple) else outs[0]
        return None

    def _grad_in_hook(self, i: int, j: int):
        def hook(g):
            c0 = _clock()
            self.step.grads_in[i][j] = g.detach().cpu().clone()
            self.log.cpu_s += _clock() - c0
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
