import pytest
import torch

from tdml_core.robust.aggregate import average_states, select_top_k, top_k_average


def test_top_k_picks_best_and_breaks_ties_by_index():
    assert select_top_k([0.5, 0.9, 0.7], 2) == [1, 2]
    assert select_top_k([0.8, 0.8, 0.8], 2) == [0, 1]
    with pytest.raises(ValueError):
        select_top_k([0.1], 2)


def test_average_of_states():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(5)}
    c = {"w": torch.tensor([100.0, 100.0]), "n": torch.tensor(5)}
    avg = average_states([a, b])
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0])) and int(avg["n"]) == 5
    glob, chosen = top_k_average([a, c, b], [0.9, 0.1, 0.8], 2)
    assert chosen == [0, 2] and torch.equal(glob["w"], torch.tensor([2.0, 4.0]))
    with pytest.raises(ValueError, match="disagree"):
        average_states([a, {"x": torch.zeros(1)}])


def test_the_outer_step_is_plain_averaging_by_default_and_nesterov_sgd_otherwise():
    from tdml_core.robust.outer import outer_step

    start = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    combined = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(7)}
    same, buf = outer_step(start, combined, None, lr=1.0, momentum=0.0)
    assert same is combined and buf is None  # bit for bit the combination
    # delta = start - combined = [1, -2]; m = delta; Nesterov step = delta + 0.5 m = [1.5, -3]
    nxt, buf = outer_step(start, combined, None, lr=0.5, momentum=0.5)
    assert torch.allclose(nxt["w"], torch.tensor([1.0 - 0.75, 2.0 + 1.5])) and int(nxt["n"]) == 7
    assert torch.allclose(buf["w"], torch.tensor([1.0, -2.0], dtype=torch.float64))
    # the next epoch: delta = [1, 1] from start [2, 2] to [1, 1]; m = 0.5 [1, -2] + [1, 1] = [1.5, 0];
    # step = [1, 1] + 0.5 [1.5, 0] = [1.75, 1]; next = [2, 2] - 0.5 step = [1.125, 1.5]
    nxt, buf = outer_step({"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([1.0, 1.0])}, buf, lr=0.5, momentum=0.5)
    assert torch.allclose(nxt["w"], torch.tensor([1.125, 1.5]))
    # heavy-ball momentum: step = m = [1.5, 0]; next = [2, 2] - 0.5 [1.5, 0]
    hb, _ = outer_step({"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([1.0, 1.0])},
                       {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}, lr=0.5, momentum=0.5, nesterov=False)
    assert torch.allclose(hb["w"], torch.tensor([1.25, 2.0]))
