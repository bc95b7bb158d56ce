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
from tdml_core.data import Dataset, batches, shard
from tdml_core.model import StagePlan, split_model
from tdml_core.runtime.context import epoch_seed, example_microbatch, make_optimizer, new_model
from tdml_core.verify import challenge
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
            self._batches[key] = list(batches(x, y, self.spec.batch_size, epoch_seed(self.spec, epoch, pipeline)))
        return self._batches[key].__getitem__

    def replay(self, pipeline: int, stage: int, epoch: int) -> StageReplay:
        v = self.spec.verification
        return StageReplay(self.modules[stage], lambda ps: make_optimizer(self.spec, ps),
                           first=stage == 0, last=stage == self.plan.n_stages - 1,
                           microbatches=self.spec.microbatches, tolerance=v.tolerance,
                           checkpoint_every=v.checkpoint_every, data=self._batch(pipeline, epoch))

    def challenges(self, seed: bytes, records: dict[Slot, dict],
                   who: dict[Slot, str] | None = None) -> dict[Slot, list[int]]:
        """Each trainer's challenged steps, from ``seed`` (unknown when it committed) and its commitment.

        ``who`` names each slot's trainer (its address, under the protocol); by default the slot ("0/1").
        """
        return {slot: challenge.pick(seed, (who or {}).get(slot, f"{slot[0]}/{slot[1]}"), int(rec["leaves"]) - 1,
                                     self.spec.verification.checks)
                for slot, rec in records.items() if rec}

    def judge(self, epoch: int, records: dict[Slot, dict], steps: dict[Slot, list[int]],
              reveals: dict[Slot, dict]) -> dict[Slot, Verdict]:
        out = {}
        for slot, chosen in steps.items():
            replay = self.replay(slot[0], slot[1], epoch)
            verdict = Verdict(slot[0], slot[1], epoch, list(chosen))
            # the number of leaves is the referee's own count of the epoch's steps, never the trainer's word
            reveal = {**(reveals.get(slot) or {"steps": {}}), "leaves": records[slot]["leaves"]}
            for t in chosen:
                verdict.findings.append(replay.check(reveal, records[slot]["root"], t))
            out[slot] = verdict
        return out
