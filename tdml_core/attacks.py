"""Dishonest trainers, simulated where a real one would act: inside its own stage process.

A trainer under attack trains its epoch honestly (``label_flip``: on flipped
labels), then replaces the update it applied, end weights minus the epoch's
start weights, by the attack's, and commits start + attacked update. Its epoch
gradient is forged to agree with the attacked update, so a check of the gradient
alone sees nothing: detection has to look at what the weights carry.

Colluders (``mean_shift``, ``alie``, ``ipm`` trainers of the same stage) share
their own honest updates through a folder only they use; none sees an honest
trainer's data or update.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from statistics import NormalDist

import torch

from tdml_core.config import AttackSpec, JobSpec

COLLUDING = ("mean_shift", "alie", "ipm")
DEFAULTS = {"gaussian": math.sqrt(200.0), "mean_shift": 1.5, "sign_flip": 1.0, "scaled": 10.0, "ipm": 0.5}

State = dict[str, torch.Tensor]


def attack_of(spec: JobSpec, pipeline: int, stage: int, epoch: int) -> AttackSpec | None:
    """The attack trainer (pipeline, stage) runs at ``epoch``, if any."""
    for a in spec.attacks:
        if a.pipeline == pipeline and a.stage == stage and epoch >= a.from_epoch:
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
