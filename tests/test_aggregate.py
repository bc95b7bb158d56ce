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
