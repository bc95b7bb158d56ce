"""The epoch's verdict rules, on hand-made updates (the flow and the audit call the same functions)."""

import numpy as np
import pytest

from tdml_core.config import DetectionSpec
from tdml_core.robust.judge import agreement, judge_epoch, layer_groups, score_outliers


def _updates(n: int, bad: dict[int, float], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, 200)
    out = []
    for p in range(n):
        u = base + rng.normal(0, 0.3, 200)
        if p in bad:
            u = bad[p] * base + rng.normal(0, 0.3, 200)
        out.append({"fc.weight": u[:150], "fc.bias": u[150:]})
    return out


def _judge(accs, ups, history=None, **det):
    n = len(ups)
    updates = {(p, 0): u for p, u in enumerate(ups)}
    grads = {k: {n_: -v for n_, v in u.items()} for k, u in updates.items()}
    trainers = {(p, 0): f"t{p}" for p in range(n)}
    return judge_epoch(accs, updates, grads, trainers, history or {}, n_stages=1, tolerance=0.15,
                       detection=DetectionSpec(**det))


def test_score_stage_tolerance_and_robust_deviation():
    flags, info = score_outliers([0.95, 0.6], 0.15, 3.5)  # 0.175 below the median 0.775
    assert flags == [False, True] and info["median"] == pytest.approx(0.775) and not info["mad_test"]
    # five scores: 0.80 is 0.10 below the median 0.90, ten robust deviations (MAD 0.01 x 1.4826)
    flags, info = score_outliers([0.90, 0.91, 0.89, 0.90, 0.80], 0.15, 3.5)
    assert flags == [False, False, False, False, True] and info["mad"] == pytest.approx(0.01)
    # a gap under 0.03 is never an outlier, however tight the rest
    assert score_outliers([0.900, 0.900, 0.900, 0.900, 0.885], 0.15, 3.5)[0] == [False] * 5


def test_layer_groups_and_agreement():
    assert layer_groups(["b.weight", "a.bias", "a.weight", "c"]) == {"a": ["a.bias", "a.weight"],
                                                                    "b": ["b.weight"], "c": ["c"]}
    u = {"w": np.array([1.0, 0.0])}
    assert agreement(u, {"w": np.array([-2.0, 0.0])}) == pytest.approx(1.0)
    assert agreement(u, {"w": np.array([0.0, 1.0])}) == pytest.approx(0.0)
    assert agreement(u, {"w": np.array([2.0, 0.0])}) == pytest.approx(-1.0)


def test_a_sign_flipped_update_is_flagged_and_evicted_on_its_third_flag_in_four_epochs():
    ups = _updates(4, {2: -1.0})
    doc = _judge([0.9, 0.9, 0.9, 0.9], ups)
    assert [v["flagged"] for v in doc["verdicts"]] == [False, False, True, False]
    assert not any(v["malicious"] for v in doc["verdicts"]) and doc["flagged"] == [False, False, True, False]
    ev = doc["verdicts"][2]["evidence"]["fc"]
    assert len(ev["points"]) == 4 and ev["flagged"] == [False, False, True, False]
    second = _judge([0.9, 0.9, 0.9, 0.9], ups, history={"t2": [True]})
    assert not any(v["malicious"] for v in second["verdicts"])  # twice is not yet enough (an honest outlier was)
    again = _judge([0.9, 0.9, 0.9, 0.9], ups, history={"t2": [True, False, True]})
    assert [v["malicious"] for v in again["verdicts"]] == [False, False, True, False]
    old = _judge([0.9, 0.9, 0.9, 0.9], ups, history={"t2": [True, False, False, True]})  # the first is out of the window
    assert not any(v["malicious"] for v in old["verdicts"])
    quick = _judge([0.9, 0.9, 0.9, 0.9], ups, history={"t2": [True]}, evict_after=2, window=3)
    assert [v["malicious"] for v in quick["verdicts"]] == [False, False, True, False]


def test_a_clean_round_flags_nobody_and_two_pipelines_skip_the_update_stage():
    doc = _judge([0.9, 0.91, 0.89, 0.9], _updates(4, {}))
    assert not any(v["flagged"] for v in doc["verdicts"]) and doc["flagged"] == [False] * 4
    two = _judge([0.9, 0.9], _updates(2, {1: -1.0}))
    assert "too few" in two["stage2"] and not any(v["flagged"] for v in two["verdicts"])


def test_a_gradient_that_disagrees_with_the_update_is_flagged():
    ups = _updates(4, {})
    updates = {(p, 0): u for p, u in enumerate(ups)}
    grads = {k: {n: -v for n, v in u.items()} for k, u in updates.items()}
    grads[(1, 0)] = {n: v for n, v in updates[(1, 0)].items()}  # "descends" away from its own update
    doc = judge_epoch([0.9] * 4, updates, grads, {(p, 0): f"t{p}" for p in range(4)}, {}, n_stages=1,
                      tolerance=0.15, detection=DetectionSpec())
    assert [v["flagged"] for v in doc["verdicts"]] == [False, True, False, False]
    assert "disagrees" in doc["verdicts"][1]["reason"]


def test_half_a_stage_colluding_is_told_apart_by_their_pipelines_scores():
    ups = _updates(4, {1: -1.0, 2: -1.0})
    doc = _judge([0.9, 0.5, 0.55, 0.92], ups)
    assert [v["flagged"] for v in doc["verdicts"]] == [False, True, True, False]
    same_scores = _judge([0.9, 0.9, 0.9, 0.9], ups)
    assert not any(v["flagged"] for v in same_scores["verdicts"])  # no majority and no score to trust


def test_a_dropped_pipeline_is_left_out():
    ups = _updates(4, {})
    updates = {(p, 0): u for p, u in enumerate(ups) if p != 3}
    grads = {k: {n: -v for n, v in u.items()} for k, u in updates.items()}
    doc = judge_epoch([0.9, 0.9, 0.9, None], updates, grads, {(p, 0): f"t{p}" for p in range(3)}, {},
                      n_stages=1, tolerance=0.15, detection=DetectionSpec())
    assert doc["flagged"] == [False, False, False, True] and len(doc["verdicts"]) == 3


def test_in_a_pipeline_only_the_last_flagged_stage_is_blamed():
    """A last stage that poisons the gradients it sends back moves its pipeline's earlier update too."""
    s0, s1 = _updates(4, {1: -1.0}, seed=1), _updates(4, {1: -1.0}, seed=2)
    updates = {**{(p, 0): u for p, u in enumerate(s0)}, **{(p, 1): u for p, u in enumerate(s1)}}
    grads = {k: {n: -v for n, v in u.items()} for k, u in updates.items()}
    trainers = {k: f"t{k[0]}{k[1]}" for k in updates}
    doc = judge_epoch([0.9] * 4, updates, grads, trainers, {}, n_stages=2, tolerance=0.15, detection=DetectionSpec())
    flagged = {v["slot"]: v["flagged"] for v in doc["verdicts"]}
    assert [s for s, f in flagged.items() if f] == ["1/1"]
    assert "made of the gradients of stage 1" in next(v["reason"] for v in doc["verdicts"] if v["slot"] == "1/0")
    assert doc["flagged"] == [False, True, False, False]


def test_noise_agrees_with_nobody_even_from_half_the_stage():
    rng = np.random.default_rng(3)
    ups = _updates(4, {})
    for p in (1, 2):  # Gaussian noise, far larger than the honest updates
        ups[p] = {k: rng.normal(0, 14, v.shape) for k, v in ups[p].items()}
    doc = _judge([0.3, 0.1, 0.1, 0.3], ups)
    assert [v["flagged"] for v in doc["verdicts"]] == [False, True, True, False]
    assert "agrees with no other trainer" in doc["verdicts"][1]["reason"]
    assert doc["verdicts"][1]["similarity"] < 0.05 < doc["verdicts"][0]["similarity"]
    lazy = _updates(4, {})
    lazy[3] = {k: np.zeros_like(v) for k, v in lazy[3].items()}  # no update at all
    assert [v["flagged"] for v in _judge([0.9] * 4, lazy)["verdicts"]] == [False, False, False, True]


def test_colluders_who_commit_one_shared_update_are_flagged_as_copies():
    ups = _updates(4, {})  # four honest updates; 1 and 2 then commit one update between them (as mean-shift does)
    shared = {k: (ups[1][k] + ups[2][k]) / 2 + 0.05 for k in ups[1]}
    ups[1] = {k: v.copy() for k, v in shared.items()}
    ups[2] = {k: v + 1e-4 for k, v in shared.items()}  # a little noise does not make them two
    doc = _judge([0.9] * 4, ups)
    by = {v["slot"]: v for v in doc["verdicts"]}
    assert [by[f"{p}/0"]["flagged"] for p in range(4)] == [False, True, True, False]
    assert by["1/0"]["copy_of"] == "2/0" and by["2/0"]["copy_of"] == "1/0" and by["0/0"]["copy_of"] is None
    assert "near copy of trainer 2/0" in by["1/0"]["reason"]
    # the same four honestly: no two are near each other
    assert not any(v["flagged"] for v in _judge([0.9] * 4, _updates(4, {}))["verdicts"])
    assert not any(v["flagged"] for v in _judge([0.9] * 4, ups, max_copy_ratio=0.0)["verdicts"])


def test_a_low_scoring_pipelines_stage_far_outside_the_well_scoring_ones_is_blamed():
    ups = _updates(4, {}, seed=1)
    for p in (1, 2):  # half the stage: each its own update x 10 (not copies, and no majority for two-means)
        ups[p] = {k: 10 * v for k, v in ups[p].items()}
    doc = _judge([0.9, 0.3, 0.35, 0.92], ups, separation=1e9)  # as when the two-means split is not clear
    by = {v["slot"]: v for v in doc["verdicts"]}
    assert [by[f"{p}/0"]["flagged"] for p in range(4)] == [False, True, True, False]
    assert "scored below the others and its stage 0 update lies" in by["1/0"]["reason"]
    assert [v["flagged"] for v in _judge([0.9, 0.3, 0.35, 0.92], ups, separation=1e9, max_outside=1e9)["verdicts"]] \
        == [False] * 4
    # the same updates with scores that flag nobody: no blame from this rule
    assert not any(v["flagged"] for v in _judge([0.9] * 4, ups, max_copy_ratio=0.0)["verdicts"]
                   if "scored below" in v["reason"])
    # an honest pipeline that merely scored low is not blamed
    low = _judge([0.9, 0.3, 0.9, 0.92], _updates(4, {}, seed=1))
    assert not any(v["flagged"] for v in low["verdicts"])
