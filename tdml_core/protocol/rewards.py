"""Who did how much verified work: the units the ledger is credited with.

Pure functions over what the ledger records, so the reward step and the audit
count the same way. One unit per epoch:
- a trainer, when it committed its weights and gradient for the epoch, its
  pipeline's local model was not flagged, and its verdict was not malicious;
- a parameter server, when it committed the score of the pipeline it validates.
"""

from __future__ import annotations


def validator_of(pipeline: int, n_pipelines: int) -> int:
    """The parameter server that cross-validates ``pipeline``: the next one round the ring."""
    return (pipeline + 1) % n_pipelines


def planned_units(epochs: int, n_pipelines: int, n_stages: int) -> int:
    return epochs * n_pipelines * (1 + n_stages)


def trainer_earns(epoch_verdicts: dict, pipeline: int, stage: int, committed: bool) -> bool:
    """``epoch_verdicts`` is the committed verdicts document of one epoch.

    A trainer earns the epoch when it committed its work, its own verdict is clean,
    and its pipeline's score was not flagged (the score cannot say who of the
    pipeline is to blame, unless a co-trainer's fraud proof says it); a pipeline
    left out because a co-trainer's update was flagged or its work failed a check
    does not cost the others their pay.
    """
    if not committed:
        return False
    mine = [v for v in epoch_verdicts["verdicts"] if v["slot"].split("/")[0] == str(pipeline)]
    proven = any(v.get("proven") for v in mine)  # a fraud proof says who of the pipeline is to blame
    if not proven and epoch_verdicts.get("score_flagged", epoch_verdicts["flagged"])[pipeline]:
        return False
    slot = f"{pipeline}/{stage}"
    return not any(v["malicious"] or v.get("flagged") for v in epoch_verdicts["verdicts"] if v["slot"] == slot)


def payout(budget: int, units: int, planned: int) -> int:
    """The contract's rule: budget · units / planned_units, rounded down."""
    return budget * units // planned


def refund(budget: int, credited: int, planned: int) -> int:
    """The contract's settlement rule: what the credited units do not earn goes back to the client."""
    return budget - budget * credited // planned
