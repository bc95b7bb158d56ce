import pytest
import torch
from torch import nn

from tdml_core.model import PlanError, TrainerSlot, build_model, plan_stages
from tdml_core.model.memory import candidate_units, estimate_layers
from tdml_core.model.plan import partition


def test_memory_follows_eq1_for_one_linear_layer():
    model = nn.Sequential(nn.Linear(10, 20))
    x = torch.randn(4, 10)
    (layer,) = estimate_layers(model, x, ["0"], bytes_per_value=4, optimizer_states=2)
    params = 10 * 20 + 20
    acts = 4 * 20
    assert layer.params == params and layer.activations == acts
    assert layer.memory_bytes == params * 4 * (2 + 2) + acts * 4
    (half,) = estimate_layers(model, x, ["0"], bytes_per_value=2, optimizer_states=2)
    assert half.memory_bytes * 2 == layer.memory_bytes


def test_units_open_containers_in_execution_order():
    net = build_model("resnet18", 10, 3, torch.randn(2, 3, 16, 16), seed=0)
    units = candidate_units(net)
    assert units[:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert "layer1.0" in units and "layer4.1" in units and units[-1] == "fc"


def test_partition_balances_and_respects_capacity():
    assert partition([1, 1, 1, 1], [None, None]) == [0, 2]
    assert partition([4, 1, 1, 1, 1], [None, None]) == [0, 1]
    # the load ratio counts: a small trainer first gets a small prefix
    assert partition([1, 1, 6, 6], [2, 100]) == [0, 1]
    assert partition([3, 3, 3], [4, 4, 100]) == [0, 1, 2]
    assert partition([5, 5], [4, 100]) is None
    assert partition([1, 2], [None, None, None]) is None


def test_plan_balances_digits_cnn_over_two_stages():
    model = build_model("digits_cnn", 10, 1, torch.randn(2, 1, 8, 8), seed=0)
    plan = plan_stages(model, torch.randn(8, 1, 8, 8), n_stages=2)
    assert plan.method == "trace" and plan.n_stages == 2
    names = [n for s in plan.stages for n in s.layers]
    assert names == ["conv1", "conv2", "pool", "fc1", "fc2"]
    assert sum(s.params for s in plan.stages) == sum(p.numel() for p in model.parameters())
    assert plan.split_points() == [plan.stages[1].layers[0]]


def test_plan_against_trainer_memory():
    model = build_model("digits_cnn", 10, 1, torch.randn(2, 1, 8, 8), seed=0)
    x = torch.randn(8, 1, 8, 8)
    total = sum(layer.memory_bytes for layer in plan_stages(model, x, 1).layers)
    small, big = TrainerSlot("small", total // 3), TrainerSlot("big", total)
    plan = plan_stages(model, x, 2, [small, big])
    assert [s.trainer for s in plan.stages] == ["small", "big"]
    assert all(s.memory_bytes <= s.trainer_memory_bytes for s in plan.stages)
    # auto: one big enough trainer is all it takes
    auto = plan_stages(model, x, None, [small, big])
    assert auto.n_stages == 1 and auto.stages[0].trainer == "big"


def test_trainer_too_small_is_a_clear_error():
    model = build_model("digits_cnn", 10, 1, torch.randn(2, 1, 8, 8), seed=0)
    with pytest.raises(PlanError, match="trainer 'tiny' .* is too small for any stage"):
        plan_stages(model, torch.randn(8, 1, 8, 8), 2, [TrainerSlot("tiny", 100), TrainerSlot("big", 10**9)])
    with pytest.raises(PlanError, match="cannot cut 5 layer"):
        plan_stages(model, torch.randn(8, 1, 8, 8), 6)
