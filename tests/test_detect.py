from tdml_core.protocol.rewards import payout, planned_units, trainer_earns, validator_of


def test_units_and_payouts_follow_the_contract_rule():
    assert planned_units(epochs=15, n_pipelines=2, n_stages=2) == 90
    assert [validator_of(p, 3) for p in range(3)] == [1, 2, 0]
    clean = {"flagged": [False, True], "verdicts": [{"slot": "0/1", "malicious": True}]}
    assert trainer_earns(clean, 0, 0, committed=True)
    assert not trainer_earns(clean, 0, 0, committed=False)
    assert not trainer_earns(clean, 0, 1, committed=True)  # found malicious
    assert not trainer_earns(clean, 1, 0, committed=True)  # pipeline flagged by its score
    by_update = {"flagged": [True, False], "score_flagged": [False, False],
                 "verdicts": [{"slot": "0/1", "malicious": False, "flagged": True}]}
    assert trainer_earns(by_update, 0, 0, committed=True)  # its co-trainer's update was the outlier
    assert not trainer_earns(by_update, 0, 1, committed=True)
    assert payout(10**18, 15, 90) == 166666666666666666
