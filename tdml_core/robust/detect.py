"""Detection: which local models, and which trainers, to distrust in an epoch.

Stage 1 (here): a local model whose cross-validation accuracy lies far below
the median of all pipelines' is flagged; it does not enter the global model and
its trainers earn nothing for the epoch. Stage 2 (per-layer gradient
projection and 2-means over the trainers of flagged pipelines) names the
trainer to evict; until it exists a flagged pipeline's trainers get a verdict
of "not malicious, pending" and nobody is evicted.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass
class Verdict:
    trainer: str  # address
    slot: str  # "pipeline/stage"
    malicious: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def score_outliers(accuracies: Sequence[float], tolerance: float) -> list[bool]:
    """Flag each accuracy more than ``tolerance`` below the median of all of them."""
    if not accuracies:
        return []
    median = statistics.median(accuracies)
    return [a < median - tolerance for a in accuracies]


def score_stage(accuracies: Sequence[float], tolerance: float,
                trainers: Sequence[Sequence[str]]) -> tuple[list[bool], list[Verdict]]:
    """Stage 1 over all pipelines: (flagged per pipeline, one verdict per trainer)."""
    flagged = score_outliers(accuracies, tolerance)
    median = statistics.median(accuracies)
    verdicts = []
    for p, (acc, bad) in enumerate(zip(accuracies, flagged)):
        for s, trainer in enumerate(trainers[p]):
            if bad:
                reason = (f"pipeline {p} scored {acc:.4f}, more than {tolerance:.2f} below the median "
                          f"{median:.4f}: excluded; per-trainer verdict pending the gradient stage")
            else:
                reason = f"pipeline {p} scored {acc:.4f} (median {median:.4f})"
            verdicts.append(Verdict(trainer, f"{p}/{s}", False, reason))
    return flagged, verdicts


def gradient_stage(flagged: Sequence[bool], verdicts: list[Verdict]) -> list[Verdict]:
    """Stage 2's place: per-layer gradient projection + 2-means names the culprit.

    Not built yet: the verdicts of stage 1 pass through unchanged.
    """
    return verdicts
