import copy

import pytest
import torch

from tdml_core.model import SplitError, build_model, plan_stages, run_stages, split_model
from tests.models import Branchy, ResidualMLP, SequentialChildren

CASES = {
    "digits_cnn": (lambda: build_model("digits_cnn", 10, 1, torch.randn(2, 1, 8, 8), 0), (8, 1, 8, 8), 2),
    "resnet18": (lambda: build_model("resnet18", 10, 3, torch.randn(2, 3, 16, 16), 0), (4, 3, 16, 16), 3),
    "residual": (lambda: ResidualMLP(), (8, 1, 8, 8), 3),
}


@pytest.mark.parametrize("name", CASES)
def test_stages_in_order_equal_the_model(name):
    make, shape, n = CASES[name]
    model = make().eval()
    x = torch.randn(*shape)
    plan = plan_stages(model, x, n)
    assert plan.method == "trace" and plan.n_stages == n
    stages = split_model(model, plan, x)
    keys = [k for s in stages for k in s.state_dict()]
    assert sorted(keys) == sorted(model.state_dict())
    with torch.no_grad():
        expected = copy.deepcopy(model).train()(x)
        got = run_stages(stages, x)
    assert (got - expected).abs().max().item() <= 1e-5


def test_residual_across_a_cut_is_carried_as_a_live_value():
    model = ResidualMLP()
    x = torch.randn(8, 1, 8, 8)
    plan = plan_stages(model, x, 3)
    assert plan.split_points() == ["b", "c"]
    s0, s1, _ = split_model(model, plan, x)
    live = s1(s0(x))
    assert isinstance(live, tuple) and len(live) == 2  # c's input and the skipped h


def test_untraceable_model_falls_back_to_children():
    model = SequentialChildren()
    x = torch.randn(8, 1, 8, 8)
    plan = plan_stages(model, x, 2)
    assert plan.method == "children" and "tracing failed" in plan.notes[0]
    stages = split_model(model, plan, x)
    with torch.no_grad():
        assert torch.allclose(run_stages(stages, x), model(x))


def test_untraceable_non_sequential_model_is_refused():
    model = Branchy()
    x = torch.randn(8, 1, 8, 8)
    plan = plan_stages(model, x, 2)
    with pytest.raises(SplitError, match="does not give its output"):
        split_model(model, plan, x)
