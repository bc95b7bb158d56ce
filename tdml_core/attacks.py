"""Dishonest trainers, simulated where a real one would act: inside its own stage process.

A trainer under attack trains its epoch honestly (``label_flip``: on flipped
labels), then replaces the update it applied, end weights minus the epoch's
start weights, by the attack's, and commits start + attacked update. Its epoch
gradient is forged to agree with the attacked update, so a check of the gradient
alone sees nothing: detection has to look at what the weights carry.

Colluders (``mean_shift``, ``alie``, ``ipm`` trainers of the same stage) share
their own honest updates through a folder only they use; none sees an honest
trainer's data or update.

The compute attacks (``free_rider``, ``lazy``, ``forged_output``, ``forged_grad``)
cheat on the work itself, through ``Tamper``'s hooks on the stage module: what
the trainer sends its neighbours, and so what its records hold, is not what the
step computes. They are what verification (``tdml_core.verify``) catches.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from statistics import NormalDist

import torch

from tdml_core.config import AttackSpec, JobSpec

COLLUDING = ("mean_shift", "alie", "ipm")
COMPUTE = ("free_rider", "lazy", "forged_output", "forged_grad")
DEFAULTS = {"gaussian": math.sqrt(200.0), "mean_shift": 1.5, "sign_flip": 1.0, "scaled": 10.0, "ipm": 0.5,
            "free_rider": 0.1, "forged_output": 1.0, "forged_grad": 1.0}

State = dict[str, torch.Tensor]


def attack_of(spec: JobSpec, pipeline: int, stage: int, epoch: int | None = None) -> AttackSpec | None:
    """The attack trainer (pipeline, stage) runs at ``epoch`` (None: at any epoch), if any."""
    for a in spec.attacks:
        if a.pipeline == pipeline and a.stage == stage and (epoch is None or epoch >= a.from_epoch):
            return a
    return None


def colluders(spec: JobSpec, attack: AttackSpec, epoch: int) -> list[int]:
    """Pipelines whose trainers at the same stage run the same colluding attack at ``epoch``."""
    return sorted(a.pipeline for a in spec.attacks
                  if a.kind == attack.kind and a.stage == attack.stage and epoch >= a.from_epoch)


def alie_z(n: int, f: int) -> float:
    """Baruch et al. 2019: the largest z that keeps the attackers inside the honest majority's spread."""
    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf(min(max((n - s) / n, 1e-6), 1 - 1e-6))


def update(start: State, end: State) -> State:
    return {k: end[k] - start[k] for k in end if end[k].is_floating_point()}


def _spread(peers: list[State], mean: State) -> State:
    if len(peers) > 1:
        return {k: torch.stack([p[k] for p in peers]).std(0, unbiased=False) for k in mean}
    return {k: torch.full_like(v, float(v.std(unbiased=False)) if v.numel() > 1 else float(v.abs())) for k, v in mean.items()}


def attacked(kind: str, honest: State, *, scale: float | None, n_pipelines: int, peers: list[State],
             generator: torch.Generator) -> State:
    """The update an attacker of ``kind`` commits instead of its ``honest`` one.

    ``peers`` are the colluders' honest updates (its own among them); with one,
    the spread of a layer's own values stands in for the spread across trainers.
    """
    c = DEFAULTS.get(kind) if scale is None else scale
    if kind == "gaussian":
        return {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) * c for k, v in honest.items()}
    if kind == "zero_gradient":
        return {k: torch.zeros_like(v) for k, v in honest.items()}
    if kind == "sign_flip":
        return {k: -c * v for k, v in honest.items()}
    if kind == "scaled":
        return {k: c * v for k, v in honest.items()}
    if kind == "label_flip":
        return honest  # the harm is in what it trained on
    peers = peers or [honest]
    mean = {k: torch.stack([p[k] for p in peers]).mean(0) for k in honest}
    if kind == "ipm":
        return {k: -c * v for k, v in mean.items()}
    if kind in ("mean_shift", "alie"):
        z = c if c is not None else alie_z(n_pipelines, len(peers))
        spread = _spread(peers, mean)
        return {k: mean[k] - z * spread[k] for k in mean}
    raise ValueError(f"unknown attack kind {kind!r}")


def forged_grad(honest_grad: State, attacked_update: State) -> State:
    """An epoch gradient that agrees with the attacked update: −update, at the honest gradient's norm."""
    out = {}
    for k, g in honest_grad.items():
        u = attacked_update.get(k)
        if u is None:
            out[k] = g
            continue
        un = float(u.norm())
        out[k] = -u * (float(g.norm()) / un) if un > 0 else torch.zeros_like(g)
    return out


class Collusion:
    """Colluders of one stage swap their honest updates through ``folder`` (their own side channel)."""

    def __init__(self, folder: str | Path, timeout_s: float):
        self.folder, self.timeout_s = Path(folder), timeout_s

    def leave(self, stage: int, me: int) -> None:
        """An evicted colluder tells its group not to wait for it any more."""
        left = self.folder / "left" / f"{stage}"
        left.mkdir(parents=True, exist_ok=True)
        (left / f"{me}").touch()

    def share(self, epoch: int, stage: int, me: int, mine: State, group: list[int]) -> list[State]:
        left = self.folder / "left" / f"{stage}"
        group = [p for p in group if p == me or not (left / f"{p}").exists()]
        where = self.folder / f"{epoch}" / f"{stage}"
        where.mkdir(parents=True, exist_ok=True)
        tmp = where / f".{me}.tmp"
        torch.save(mine, tmp)
        tmp.replace(where / f"{me}.pt")
        deadline = time.monotonic() + self.timeout_s
        peers = {me: mine}
        while len(peers) < len(group) and time.monotonic() < deadline:
            for p in group:
                path = where / f"{p}.pt"
                if p not in peers and path.exists():
                    try:
                        peers[p] = torch.load(path, weights_only=True)
                    except Exception:  # still being written
                        pass
            time.sleep(0.05)
        return [peers[p] for p in sorted(peers)]


class Tamper:
    """A dishonest trainer's hooks on its own stage module, idle unless its attack is a compute attack.

    Installed before the records' hooks, so the records hold what was really sent;
    a ``hidden`` forger acts after them instead (``install_late``): its records
    hold the honest values, and only the signature it gave with what it sent
    (``sent_digests``) shows what went out.
    ``forged_output`` adds noise to the activations it sends downstream,
    ``forged_grad`` to the gradients it sends upstream; ``lazy`` skips a share
    ``q`` of its steps and ``free_rider`` all of them: on a skipped step it sends
    the last values it sent again and does not move its weights.
    """

    def __init__(self, module: torch.nn.Module, *, first: bool, last: bool):
        self.first, self.last = first, last
        self.kind: str | None = None
        self.skip = False
        self._mb = 0
        self._stale_out: dict[int, tuple] = {}
        self._stale_grad: dict[tuple[int, int], torch.Tensor] = {}
        self._handles: list = []
        self.hidden = False  # a hidden forger's hooks are the late ones (``install_late``)
        self._sent: dict[str, dict] = {}
        module.register_forward_pre_hook(self._hook(self._pre, late=False))
        module.register_forward_hook(self._hook(self._post, late=False))

    def install_late(self, module: torch.nn.Module) -> None:
        """The hooks a hidden forger runs after the records' own (call after installing the ``Recorder``)."""
        module.register_forward_pre_hook(self._hook(self._pre, late=True))
        module.register_forward_hook(self._hook(self._post, late=True))

    def _hook(self, fn, late: bool):
        def hook(*args):
            if self.hidden != late:
                return None
            return fn(*args)
        return hook

    def sent_digests(self) -> dict | None:
        """A hidden forger's digests of what it really sent this step, per field (None: its records say it)."""
        if not self.hidden or self.kind is None:
            return None
        from tdml_core.verify.records import tensors_digest

        out = {}
        if self._sent.get("outputs"):
            out["outputs"] = [tensors_digest(v) for _, v in sorted(self._sent["outputs"].items())]
        if self._sent.get("grads_out"):
            out["grads_out"] = [tensors_digest(tuple(g for _, g in sorted(v.items())))
                                for _, v in sorted(self._sent["grads_out"].items())]
        return out

    def forget(self) -> None:
        """A new trainer holds the slot (or a new run starts): nothing it sent before is its to resend."""
        self._stale_out.clear()
        self._stale_grad.clear()

    def begin_epoch(self, attack: AttackSpec | None, n_steps: int, generator: torch.Generator) -> None:
        self.kind = attack.kind if attack is not None and attack.kind in COMPUTE else None
        self.hidden = bool(attack is not None and attack.hidden and self.kind in ("forged_output", "forged_grad"))
        self.scale = DEFAULTS.get(self.kind) if attack is None or attack.scale is None else attack.scale
        self.gen = generator
        self.skipped: set[int] = set()
        if self.kind == "free_rider":
            self.skipped = set(range(n_steps))
        elif self.kind == "lazy":
            k = min(n_steps, math.ceil(attack.q * n_steps))
            self.skipped = set(torch.randperm(n_steps, generator=generator)[:k].tolist())

    def begin_step(self, step: int) -> bool:
        """Whether this step is skipped (then the caller leaves its weights where they are)."""
        self.skip, self._mb = step in self.skipped, 0
        self._sent = {"outputs": {}, "grads_out": {}}
        return self.skip

    def end_step(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _noise_like(self, v: torch.Tensor) -> torch.Tensor:
        spread = float(v.detach().float().std()) if v.numel() > 1 else 1.0
        noise = torch.randn(v.shape, generator=self.gen, dtype=torch.float32)
        return (noise * self.scale * (spread or 1.0)).to(v.dtype).to(v.device)

    def _pre(self, module, args):
        if self.kind is None or self.first:
            return
        i = self._mb
        for j, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                self._handles.append(a.register_hook(self._grad_hook(i, j)))

    def _grad_hook(self, i: int, j: int):
        def hook(g):
            if self.skip:
                g = self._stale_grad.get((i, j), torch.zeros_like(g)).to(g.device)
            elif self.kind == "forged_grad":
                g = g + self._noise_like(g)
            self._stale_grad[(i, j)] = g.detach().clone()
            if self.hidden:
                self._sent["grads_out"].setdefault(i, {})[j] = g.detach().cpu()
            return g
        return hook

    def _post(self, module, args, output):
        if self.kind is None:
            return None
        i = self._mb
        self._mb += 1
        if self.last:
            return None
        outs = output if isinstance(output, tuple) else (output,)
        if self.skip:  # stale values, still on the graph so the schedule's backward runs (with nothing to learn)
            sent = tuple(o * 0 + self._stale_out.get(i, (torch.zeros_like(o),) * len(outs))[j].to(o.device)
                         for j, o in enumerate(outs))
        elif self.kind == "forged_output":
            sent = tuple(o + self._noise_like(o) for o in outs)
        else:
            sent = outs
        self._stale_out[i] = tuple(o.detach().clone() for o in sent)
        if self.hidden:
            self._sent["outputs"][i] = tuple(o.detach().cpu() for o in sent)
        return sent if isinstance(output, tuple) else sent[0]


def free_ride(start: State, state: State, stale: State | None, scale: float, generator: torch.Generator) -> State:
    """A free rider's end weights: the epoch's start plus its last real update, perturbed, and nothing learnt."""
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = start[k].clone()
            continue
        u = stale.get(k) if stale else None
        if u is None:
            out[k] = start[k].clone()
            continue
        noise = torch.randn(u.shape, generator=generator, dtype=u.dtype)
        out[k] = start[k] + u * (1 + scale * noise)
    return out
