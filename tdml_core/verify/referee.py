"""The verifier of one job: draws each trainer's challenges, re-runs them, and says who failed.

It holds what any participant derives from the job spec (the model's split, the
optimizer, the shards' batch order) and the shards themselves, so it can rebuild
the first stage's inputs and the last stage's targets; everything else comes
from what the trainers reveal.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from tdml_core.config import JobSpec
from tdml_core.data import Dataset, shard
from tdml_core.model import StagePlan, split_model
from tdml_core.runtime.context import example_microbatch, make_optimizer, new_model, round_batches
from tdml_core.verify import challenge, signing
from tdml_core.verify.recompute import Finding, StageReplay

Slot = tuple[int, int]


@dataclass
class Verdict:
    """One trainer's checks in one epoch."""

    pipeline: int
    stage: int
    epoch: int
    steps: list[int]
    findings: list[Finding] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(not f.ok for f in self.findings)

    @property
    def first_failure(self) -> Finding | None:
        return next((f for f in self.findings if not f.ok), None)

    def as_doc(self) -> dict:
        return {"pipeline": self.pipeline, "stage": self.stage, "epoch": self.epoch, "steps": self.steps,
                "failed": self.failed, "findings": [f.as_doc() for f in self.findings]}


def slot_records(locals_: list[dict], pipeline_ids: list[int]) -> dict[Slot, dict]:
    """Every trainer's commitment from ``PipelineCluster.train_epoch``'s per-pipeline results, by slot."""
    return {(p, s): rec for lc, p in zip(locals_, pipeline_ids) for s, rec in enumerate(lc["records"])}


class Referee:
    """``Referee(spec, plan, ds)`` shards ``ds`` itself; under the protocol the referee is given the stage
    modules (``modules``) and reads each shard it checks from the store (``shard_of(pipeline)`` → (x, y))."""

    def __init__(self, spec: JobSpec, plan: StagePlan, ds: Dataset | None = None, *,
                 modules: list[nn.Module] | None = None,
                 shard_of: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.spec, self.plan = spec, plan
        if modules is None:
            modules = split_model(copy.deepcopy(new_model(spec, ds)), plan, example_microbatch(ds, spec))
        self.modules = modules
        self.shard_of = shard_of or (lambda p: shard(ds, p, spec.data_parallel, spec.seed))
        self._batches: dict[tuple[int, int], list] = {}  # (pipeline, epoch) → that epoch's batches

    def n_leaves(self, pipeline: int, epoch: int) -> int:
        """How many leaves an honest record of ``pipeline``'s epoch has: one per step, and the end weights."""
        self._batch(pipeline, epoch)
        return len(self._batches[(pipeline, epoch)]) + 1

    def _batch(self, pipeline: int, epoch: int):
        """step → the shard's (x, y) batch of ``pipeline`` in ``epoch``, built once for all of its stages."""
        key = (pipeline, epoch)
        if key not in self._batches:
            self._batches = {k: v for k, v in self._batches.items() if k[1] == epoch}  # earlier epochs are done
            x, y = self.shard_of(pipeline)
            self._batches[key] = round_batches(self.spec, x, y, epoch, pipeline)
        return self._batches[key].__getitem__

    def signers(self, pipeline: int, who: dict[Slot, str] | None = None) -> list[str]:
        """The addresses that sign ``pipeline``'s messages, stage by stage: ``who``'s, or the slots' own keys."""
        return [(who or {}).get((pipeline, s)) or signing.slot_address(self.spec.seed, pipeline, s)
                for s in range(self.plan.n_stages)]

    def replay(self, pipeline: int, stage: int, epoch: int, who: dict[Slot, str] | None = None) -> StageReplay:
        v = self.spec.verification
        return StageReplay(self.modules[stage], lambda ps: make_optimizer(self.spec, ps),
                           first=stage == 0, last=stage == self.plan.n_stages - 1,
                           microbatches=self.spec.microbatches, tolerance=v.tolerance,
                           checkpoint_every=v.checkpoint_every, data=self._batch(pipeline, epoch),
                           signed=(pipeline, epoch, stage, self.signers(pipeline, who)))

    def challenges(self, seed: bytes, records: dict[Slot, dict],
                   who: dict[Slot, str] | None = None) -> dict[Slot, list[int]]:
        """Each trainer's challenged steps, from ``seed`` (unknown when it committed) and its commitment.

        The trainers of one pipeline draw the same steps, so that what each stage sent can be held against
        what its neighbour says it received. ``who`` (each slot's trainer) is accepted for the callers that
        name the trainers; the draw depends on the pipeline alone.
        """
        v = self.spec.verification
        return {slot: challenge.pick(seed, f"pipeline {slot[0]}", int(rec["leaves"]) - 1, v.checks,
                                     every=v.checkpoint_every)
                for slot, rec in records.items() if rec}

    def judge(self, epoch: int, records: dict[Slot, dict], steps: dict[Slot, list[int]],
              reveals: dict[Slot, dict], who: dict[Slot, str] | None = None) -> dict[Slot, Verdict]:
        """Re-run every challenged step; then hold what each stage sent against what its neighbour received.

        ``who`` names the address that signs for each slot (under the protocol, its trainer's).
        """
        out, proven = {}, {}
        for slot, chosen in steps.items():
            replay = self.replay(slot[0], slot[1], epoch, who)
            verdict = Verdict(slot[0], slot[1], epoch, list(chosen))
            # the number of leaves is the referee's own count of the epoch's steps, never the trainer's word
            reveal = {**(reveals.get(slot) or {"steps": {}}), "leaves": records[slot]["leaves"]}
            for t in chosen:
                verdict.findings.append(replay.check(reveal, records[slot]["root"], t))
            out[slot] = verdict
            if not verdict.failed:  # every revealed leaf of its segments is in its root
                proven[slot] = {t: e["leaf"] for t, e in reveal["steps"].items() if "leaf" in e}
        for (p, s), leaves in sorted(proven.items()):
            if (p, s + 1) in proven:
                for slot, finding in self._held_against(p, s, leaves, proven[(p, s + 1)]):
                    out[slot].findings.append(finding)
        return out

    @staticmethod
    def _held_against(pipeline: int, stage: int, up: dict, down: dict) -> list[tuple[Slot, Finding]]:
        """Steps where stage ``stage``'s record of what it sent and stage ``stage + 1``'s of what it got differ.

        Both records passed their checks, so the receiver holds the sender's signature over what it got: a
        sender whose own record says otherwise signed one thing and recorded another, and the finding is
        against it.
        """
        found = []
        for t in sorted(set(up) & set(down)):
            a, b = up[t], down[t]
            if "outputs" not in a or "inputs" not in b:
                continue  # the end-weights leaf
            for sender, sent, got, kind in (((pipeline, stage), a["outputs"], b["inputs"], signing.ACTIVATIONS),
                                            ((pipeline, stage + 1), b["grads_out"], a["grads_in"], signing.GRADIENTS)):
                if sent != got:
                    found.append((sender, Finding(t, False, "signed", f"step {t}: it signed {kind} for its neighbour "
                                                  f"that its own record of the step does not hold", float("inf"),
                                                  (t, t + 1))))
        return found
