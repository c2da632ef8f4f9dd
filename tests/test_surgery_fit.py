"""The cost engine's fitter: lands in the window, keeps aligned counts, trades coarse steps."""

from __future__ import annotations

import pytest
import torch

from compressor.errors import InputError, TargetNotReachedError
from compressor.surgery.fit import FitUnit, aligned_counts, check_round_to, fit_budget


def _unit(key: str, size: int, base: float, fixed: int = 0) -> FitUnit:
    scores = base + torch.arange(size, dtype=torch.float32) / 1000
    return FitUnit(key, scores, torch.arange(size) < fixed)


def _linear_cost(weights: dict[str, int]):
    """A deterministic cost: each kept channel of unit k costs weights[k]."""
    return lambda keep: sum(weights[k] * int(m.sum()) for k, m in keep.items())


COARSE_FINE = {"coarse": 40, "fine": 1}  # 10 coarse (400) + 100 fine (100) = 500


def test_the_removal_lands_in_the_window_with_finer_steps():
    units = [_unit("coarse", 10, 0.0), _unit("fine", 100, 0.5)]
    fit = fit_budget(units, _linear_cost(COARSE_FINE), target=250, low=248)
    assert 248 <= fit.after <= 250 and fit.miss is None
    # coarse channels go first (lowest scores) until the next would undershoot (220):
    # fine ones take the last 10
    assert [int(m.sum()) for m in fit.masks] == [4, 90]
    assert fit.before == 500 and fit.removed == 6 + 10 and fit.restored == 0


def test_a_start_in_the_window_is_kept_as_it_is():
    units = [_unit("coarse", 10, 0.0), _unit("fine", 100, 0.5)]
    start = [torch.arange(10) % 2 == 0, torch.arange(100) < 50]  # 5 * 40 + 50 = 250
    fit = fit_budget(units, _linear_cost(COARSE_FINE), 250, 248, start=start)
    assert all(torch.equal(a, b) for a, b in zip(fit.masks, start))
    assert fit.removed == fit.restored == 0


def test_a_coarse_step_back_is_traded_for_fine_steps_down():
    units = [_unit("coarse", 10, 0.0), _unit("fine", 100, 0.5)]
    start = [torch.arange(10) >= 7, torch.ones(100, dtype=torch.bool)]  # 3 * 40 + 100 = 220
    fit = fit_budget(units, _linear_cost(COARSE_FINE), 250, 248, start=start)
    # restoring a coarse channel overshoots (260): one comes back, ten fine ones go
    assert [int(m.sum()) for m in fit.masks] == [4, 90] and fit.after == 250
    assert fit.restored == 1 and fit.removed == 10


def test_a_miss_says_why():
    units = [_unit("coarse", 10, 0.0)]
    fit = fit_budget(units, _linear_cost(COARSE_FINE), 250, 248)
    assert fit.after == 240 and fit.miss is not None
    assert "costs 240, under the window's low end 248" in fit.miss
    assert "the finest step back adds 40 and overshoots" in fit.miss


@pytest.mark.parametrize("round_to", [1, 4, 8])
def test_aligned_counts_meet_the_budget(round_to):
    sizes = {"a": 30, "b": 64, "c": 7}
    units = [_unit(k, n, i * 0.3) for i, (k, n) in enumerate(sizes.items())]
    weights = {"a": 5, "b": 3, "c": 11}
    dense = sum(weights[k] * n for k, n in sizes.items())
    target = dense // 2
    fit = fit_budget(units, _linear_cost(weights), target, target - 0.01 * dense, round_to=round_to)
    assert target - 0.01 * dense <= fit.after <= target
    for unit, mask in zip(units, fit.masks):
        count = int(mask.sum())
        assert count % round_to == 0 or count == sizes[unit.key]
        assert torch.equal(mask, unit.scores >= unit.scores[mask].min())  # the best ones


def test_fixed_channels_stay_and_set_the_floor():
    units = [_unit("a", 16, 0.0, fixed=3)]
    fit = fit_budget(units, _linear_cost({"a": 1}), target=4, low=4, round_to=4)
    assert int(fit.masks[0].sum()) == 4 and bool(fit.masks[0][:3].all())
    assert aligned_counts(16, 3, 4) == [4, 8, 12, 16]
    assert aligned_counts(6, 0, 8) == [6]  # a unit narrower than the multiple stays whole


def test_below_the_smallest_network_is_refused():
    units = [_unit("a", 16, 0.0)]
    with pytest.raises(TargetNotReachedError, match="smallest network"):
        fit_budget(units, _linear_cost({"a": 1}), target=3, low=2, round_to=4)


@pytest.mark.parametrize("bad", [0, -2, 2.5, "8", True])
def test_bad_round_to_is_refused(bad):
    with pytest.raises(InputError, match=f"round_to {bad!r}: give a whole number"):
        check_round_to(bad)


def test_a_floor_keeps_every_unit_from_collapsing():
    # "cheap" has the lowest scores: without a floor it loses all but one channel
    units = [_unit("cheap", 32, 0.0), _unit("wide", 32, 0.5)]
    weights = {"cheap": 1, "wide": 1}
    bare = fit_budget(units, _linear_cost(weights), target=32, low=32)
    assert [int(m.sum()) for m in bare.masks] == [1, 31] and bare.floor == 0.0
    fit = fit_budget(units, _linear_cost(weights), target=32, low=32, floor=0.375)
    assert [int(m.sum()) for m in fit.masks] == [12, 20] and fit.floor == 0.375
    # the floor keeps each unit's best channels; aligned, it rounds up to a multiple
    assert torch.equal(fit.masks[0], torch.arange(32) >= 20)
    aligned = fit_budget(units, _linear_cost(weights), 32, 24, floor=0.375, round_to=8)
    assert [int(m.sum()) for m in aligned.masks] == [16, 16]


def test_a_floor_the_budget_cannot_afford_halves_then_goes():
    units = [_unit("a", 32, 0.0), _unit("b", 32, 0.5)]
    weights = {"a": 1, "b": 1}
    halved = fit_budget(units, _linear_cost(weights), target=16, low=16, floor=0.5)
    assert halved.floor == 0.25 and [int(m.sum()) for m in halved.masks] == [8, 8]
    gone = fit_budget(units, _linear_cost(weights), target=4, low=4, floor=0.5)
    assert gone.floor == 0.0 and [int(m.sum()) for m in gone.masks] == [1, 3]
