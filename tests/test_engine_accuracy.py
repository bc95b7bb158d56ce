"""The README's figures: the example job against its single-node reference."""

import pytest

from tdml_core.config import load_spec
from tdml_core.runtime.baselines import single_node
from tdml_core.runtime.engine import train


@pytest.mark.slow
def test_example_reaches_95_and_matches_single_node():
    spec = load_spec("examples/digits.yaml")
    tdml = train(spec)
    single = single_node(spec)
    assert tdml.final_accuracy >= 0.95
    assert abs(tdml.final_accuracy - single.final_accuracy) <= 0.01
    # every epoch selected exactly top_k local models
    assert all(sum(lc["selected"] for lc in e["local"]) == spec.top_k for e in tdml.epochs)
