"""The verifier's side: re-run a trainer's challenged steps from what it revealed and compare.

A check of step t replays its segment (from the checkpoint at or before t to
the next one): it first confirms that every revealed leaf is in the committed
Merkle root and that every revealed tensor has its leaf's digest, that the first
stage's inputs and the last stage's targets are the shard's batch, and then
recomputes each microbatch's forward and backward, and the optimizer's step,
comparing the activations and gradients the trainer sent, and the weights it
reached, with what the recomputation gives.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tdml_core.artifacts import state_digest
from tdml_core.verify import merkle, signing
from tdml_core.verify.records import FIELDS, fast_digest, leaf_bytes, load_optimizer_state, tensors_digest


@dataclass
class Finding:
    """The outcome of checking one challenged step of one trainer."""

    step: int
    ok: bool
    what: str = ""  # failed: proof | digest | signature | signed | data | targets | outputs | grads_out | weights | missing
    detail: str = ""
    max_diff: float = 0.0  # the largest relative difference met (recomputed against revealed)
    segment: tuple[int, int] = (0, 0)

    def as_doc(self) -> dict:
        return {"step": self.step, "ok": self.ok, "what": self.what, "detail": self.detail,
                "max_diff": self.max_diff if math.isfinite(self.max_diff) else "inf", "segment": list(self.segment)}


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (exact types: 0 or inf)."""
    if a.shape != b.shape:
        return float("inf")
    if not b.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    scale = float(b.detach().abs().max()) if b.numel() else 0.0
    diff = float((a.detach().cpu().float() - b.detach().cpu().float()).abs().max()) if b.numel() else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


@contextmanager
def one_thread():
    """Torch on one thread for the calling thread, as the stage processes train.

    Torch's thread count belongs to each thread (OpenMP's per-thread setting, MKL's
    local one), and referees check pipelines side by side in threads: each check sets
    its own thread's count and gives it back, and no check changes another's.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class StageReplay:
    """What the verifier needs to re-run one stage: a copy of its module and how it trains."""

    module: nn.Module
    make_optimizer: Callable[[object], torch.optim.Optimizer]
    first: bool
    last: bool
    microbatches: int
    tolerance: float
    checkpoint_every: int = 1
    data: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None  # step → the shard's (x, y) batch
    diffs: list = field(default_factory=list)
    # who signs what this stage receives: (pipeline, epoch, stage, the pipeline's signers stage by stage)
    signed: tuple[int, int, int, list] | None = None

    def check(self, reveal: dict, root_hex: str, step: int) -> Finding:
        # one thread, as the stage processes train: with two, ResNet-18's convolutions sum their gradients in
        # another order, and two steps later its activations were 3e-4 apart (relative) from the trainer's
        with one_thread():
            try:
                return self._check(reveal, bytes.fromhex(root_hex), int(reveal["leaves"]), step)
            except _Failed as f:
                return f.finding

    def _fail(self, step, what, detail, diff=0.0, segment=(0, 0)):
        raise _Failed(Finding(step, False, what, detail, diff, segment))

    def _check(self, reveal: dict, root: bytes, n_leaves: int, step: int) -> Finding:
        n_steps = n_leaves - 1
        start = step - step % self.checkpoint_every
        end = min(start + self.checkpoint_every, n_steps)
        seg = (start, end)
        entries = reveal.get("steps", {})
        for t in range(start, end + 1):
            e = entries.get(t)
            if e is None or "leaf" not in e:
                self._fail(step, "missing", f"step {t} was not revealed", segment=seg)
            path = [bytes.fromhex(h) for h in e.get("proof", [])]
            leaf = e["leaf"]
            if leaf.get("step") != t or not merkle.verify(merkle.leaf_hash(leaf_bytes(leaf)), t, n_leaves, path, root):
                self._fail(step, "proof", f"the record of step {t} is not in the committed root", segment=seg)
        first_e, end_e = entries[start], entries[end]
        self._digests(step, seg, n_steps, first_e, end_e, [entries[t] for t in range(start, end)])
        # replay
        self.module.load_state_dict(first_e["weights"])
        self.module.train()
        opt = self.make_optimizer(self.module.parameters())
        load_optimizer_state(opt, first_e["optim"])
        saved_rng = torch.get_rng_state()
        torch.set_rng_state(first_e["rng"])
        worst = 0.0
        try:
            for t in range(start, end):
                worst = max(worst, self._replay_step(step, seg, t, entries[t], opt))
        finally:
            torch.set_rng_state(saved_rng)
        reached = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        for k, v in end_e["weights"].items():
            d = relative_diff(reached[k], v)
            worst = max(worst, d)
            if d > self.tolerance:
                self._fail(step, "weights", f"the weights after step {end - 1} ({k}) are not what its steps give",
                           d, seg)
        self.diffs.append(worst)
        return Finding(step, True, max_diff=worst, segment=seg)

    def _digests(self, step, seg, n_steps, first_e, end_e, steps) -> None:
        for name, value in (("weights", first_e.get("weights")), ("optim", first_e.get("optim"))):
            if value is None or fast_digest(value) != first_e["leaf"].get(name):
                self._fail(step, "digest", f"the revealed {name} of step {seg[0]} do not match its record", segment=seg)
        rng = first_e.get("rng")
        if rng is None or tensors_digest([rng]) != first_e["leaf"].get("rng"):
            self._fail(step, "digest", f"the revealed random state of step {seg[0]} does not match its record",
                       segment=seg)
        digest_of = state_digest if seg[1] == n_steps else fast_digest  # the last leaf holds the committed digest
        if end_e.get("weights") is None or digest_of(end_e["weights"]) != end_e["leaf"].get("weights"):
            self._fail(step, "digest", f"the revealed weights after step {seg[1] - 1} do not match the record",
                       segment=seg)
        for e in steps:
            t = e["leaf"]["step"]
            for name in FIELDS:
                values = e.get(name) or []
                want = e["leaf"].get(name)
                got = [tensors_digest(v if isinstance(v, tuple) else (v,)) for v in values] if values else None
                if got != want:
                    self._fail(step, "digest", f"the revealed {name} of step {t} do not match its record", segment=seg)
            self._signatures(step, seg, e, n_steps)
            if self.data is not None:
                x, y = self.data(t)
                if self.first and [tensors_digest((m,)) for m in x.tensor_split(self.microbatches)] != \
                        [tensors_digest(v) for v in e["inputs"]]:
                    self._fail(step, "data", f"step {t} ran on inputs other than its shard's batch", segment=seg)
                if self.last and [tensors_digest((m,)) for m in y.tensor_split(self.microbatches)] != \
                        [tensors_digest((v,)) for v in e["targets"]]:
                    self._fail(step, "targets", f"step {t} trained on labels other than its shard's", segment=seg)

    def _signatures(self, step, seg, entry: dict, n_steps: int) -> None:
        """What the record says the stage received must carry the signature of the neighbour that sent it."""
        if self.signed is None:
            return
        pipeline, epoch, stage, signers = self.signed
        leaf, paths = entry["leaf"], entry.get("paths") or {}
        t = leaf["step"]
        for peer, kind, name, sig in ((stage - 1, signing.ACTIVATIONS, "inputs", "sig_in"),
                                      (stage + 1, signing.GRADIENTS, "grads_in", "sig_grads")):
            if not 0 <= peer < len(signers):
                continue
            who = signing.signed_by(pipeline, epoch, t, kind, peer, leaf.get(name), n_steps, leaf.get(sig),
                                    paths.get(sig))
            if who != signers[peer]:
                self._fail(step, "signature", f"step {t}: the {kind} it says it received from stage {peer} do not "
                           f"carry that trainer's signature", segment=seg)

    def _replay_step(self, step, seg, t, e, opt) -> float:
        worst = 0.0
        opt.zero_grad(set_to_none=True)
        for i in range(self.microbatches):
            inp = tuple(v.clone().requires_grad_(v.is_floating_point() and not self.first) for v in e["inputs"][i])
            out = self.module(*inp)
            outs = out if isinstance(out, tuple) else (out,)
            if self.last:
                F.cross_entropy(out, e["targets"][i]).backward()
            else:
                for j, (o, sent) in enumerate(zip(outs, e["outputs"][i])):
                    d = relative_diff(o, sent)
                    worst = max(worst, d)
                    if d > self.tolerance:
                        self._fail(step, "outputs", f"step {t} microbatch {i}: the activations sent are not what "
                                   f"the stage computes from what it received", d, seg)
                pairs = [(o, g) for o, g in zip(outs, e["grads_in"][i]) if o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], grad_tensors=[g for _, g in pairs])
            if not self.first:
                got = [a.grad for a in inp if a.requires_grad]
                for g, sent in zip(got, e["grads_out"][i]):
                    d = relative_diff(g if g is not None else torch.zeros_like(sent), sent)
                    worst = max(worst, d)
                    if d > self.tolerance:
                        self._fail(step, "grads_out", f"step {t} microbatch {i}: the gradients sent upstream are "
                                   f"not what the stage computes from what it received", d, seg)
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.div_(self.microbatches)
        opt.step()
        return worst


class _Failed(Exception):
    def __init__(self, finding: Finding):
        self.finding = finding
