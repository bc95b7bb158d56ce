from tdml_core.protocol.rewards import payout, planned_units, trainer_earns, validator_of
from tdml_core.robust.detect import score_outliers, score_stage


def test_a_score_far_below_the_median_is_flagged():
    assert score_outliers([0.97, 0.96, 0.41, 0.95], tolerance=0.15) == [False, False, True, False]
    assert score_outliers([0.97, 0.90], tolerance=0.15) == [False, False]
    assert score_outliers([0.97, 0.30], tolerance=0.15) == [False, True]


def test_score_stage_gives_every_trainer_a_verdict_and_evicts_nobody_alone():
    flagged, verdicts = score_stage([0.95, 0.20], 0.15, [["0xa0", "0xa1"], ["0xb0", "0xb1"]])
    assert flagged == [False, True]
    assert [v.slot for v in verdicts] == ["0/0", "0/1", "1/0", "1/1"]
    assert [v.trainer for v in verdicts] == ["0xa0", "0xa1", "0xb0", "0xb1"]
    assert not any(v.malicious for v in verdicts)  # naming the culprit is the gradient stage's job
    assert "pending the gradient stage" in verdicts[2].reason and "excluded" in verdicts[3].reason


def test_units_and_payouts_follow_the_contract_rule():
    assert planned_units(epochs=15, n_pipelines=2, n_stages=2) == 90
    assert [validator_of(p, 3) for p in range(3)] == [1, 2, 0]
    clean = {"flagged": [False, True], "verdicts": [{"slot": "0/1", "malicious": True}]}
    assert trainer_earns(clean, 0, 0, committed=True)
    assert not trainer_earns(clean, 0, 0, committed=False)
    assert not trainer_earns(clean, 0, 1, committed=True)  # found malicious
    assert not trainer_earns(clean, 1, 0, committed=True)  # pipeline flagged
    assert payout(10**18, 15, 90) == 166666666666666666
