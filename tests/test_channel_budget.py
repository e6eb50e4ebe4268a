"""The channel allocation's greedy and its exchanges (pruning/channel_budget.py), on groups and budgets made up."""
from types import SimpleNamespace

import pytest

from cnn_sparsegpt.pruning.channel_budget import allocate, allocation_cost
from cnn_sparsegpt.utils import UserError


class Budget:
    """A model's cost as a sum over groups of a fixed share per removed unit (of a dense total of 1)."""
    what = "macs"

    def __init__(self, share: dict[int, float]):
        self.share = share

    def total(self, removed: dict[int, int]) -> float:
        return 1.0 - sum(self.share[g] * k for g, k in removed.items())


def groups(*sizes):
    return [SimpleNamespace(units=list(range(n)), unit_step=lambda r: r, reason="") for n in sizes]


def curve(per_unit: float, n: int):
    return list(range(n)), [per_unit * (k + 1) for k in range(n)]


def test_an_overshooting_step_is_exchanged_for_smaller_ones():
    """Group 0's steps save a quarter of the model each at the best rate, so the greedy's second one takes a target
    of 0.6 to 0.5; giving it back and taking three of group 1's steps meets 0.6 for less."""
    gs = groups(32, 64)
    budget = Budget({0: 0.25 / 8, 1: 0.05 / 8})
    curves = {0: curve(1 / 8, 32), 1: curve(0.25 / 8, 64)}  # rates: 4 and 5 per unit of the model saved
    removed = allocate(gs, curves, budget, 0.6, 8)
    assert removed == {0: 8, 1: 24}
    assert budget.total(removed) == pytest.approx(0.6)
    assert allocation_cost(curves, removed) == pytest.approx(1.75)  # the greedy alone: 2.0


def test_exchanges_keep_what_costs_less_and_the_target():
    gs = groups(32, 64)
    budget = Budget({0: 0.25 / 8, 1: 0.05 / 8})
    curves = {0: curve(1 / 8, 32), 1: curve(0.5 / 8, 64)}  # group 1 now twice as dear: the overshoot is cheaper
    assert allocate(gs, curves, budget, 0.6, 8) == {0: 16, 1: 0}
    with pytest.raises(UserError, match=r"smallest reachable is 18\.0%"):  # 8 of each group stay
        allocate(gs, curves, Budget({0: 0.25 / 8, 1: 0.01 / 8}), 0.1, 8)
