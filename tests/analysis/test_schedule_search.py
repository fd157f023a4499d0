"""Least-drift checkpoint search: the DP against brute force, scores and step numbering."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from catome_export.analysis.result import PairAnalysis
from catome_export.analysis.schedule_search import (
    optimal_checkpoints,
    schedule_drift,
    schedule_loop_indices,
    segment_costs,
    to_step_numbers,
)
from catome_export.analysis.tracking import TrackingConfig
from catome_export.errors import CatomeError
from catome_export.merging import parse_schedule
from catome_export.models.sites import MergeSite


def _drift_by_definition(cost: np.ndarray, checkpoints: tuple[int, ...]) -> float:
    """Sum over steps s of cost[c(s), s], c(s) the last checkpoint <= s."""
    total = 0.0
    for s in range(cost.shape[0]):
        c = max(p for p in checkpoints if p <= s)
        total += cost[c, s]
    return total


def _random_cost(rng: np.random.Generator, t: int) -> np.ndarray:
    cost = rng.random((t, t))
    np.fill_diagonal(cost, 0.0)
    return cost


@pytest.mark.parametrize("seed", range(6))
def test_dp_finds_the_brute_force_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = int(rng.integers(1, 9))
    cost = _random_cost(rng, t)
    for k in range(1, t + 1):
        brute = min(
            _drift_by_definition(cost, (0, *rest)) for rest in itertools.combinations(range(1, t), k - 1)
        )
        found = optimal_checkpoints(cost, k)
        assert found.drift == pytest.approx(brute)
        assert len(found.loop_indices) == k
        assert found.loop_indices[0] == 0
        assert list(found.loop_indices) == sorted(set(found.loop_indices))
        assert _drift_by_definition(cost, found.loop_indices) == pytest.approx(found.drift)
        assert schedule_drift(cost, found.loop_indices) == pytest.approx(found.drift)


def test_dp_on_a_structured_cost_picks_the_change_points() -> None:
    # pairs stay put within blocks [0, 3), [3, 7), [7, 10) and change between them
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    cost = (labels[:, None] != labels[None, :]).astype(float)
    found = optimal_checkpoints(cost, 3)
    assert found.loop_indices == (0, 3, 7)
    assert found.drift == 0.0
    assert optimal_checkpoints(cost, 2).drift == 3.0  # one block is served by a stale cache


def test_segment_costs() -> None:
    cost = np.arange(16, dtype=float).reshape(4, 4)
    seg = segment_costs(cost)
    assert seg.shape == (4, 5)
    assert seg[1, 4] == cost[1, 1] + cost[1, 2] + cost[1, 3]
    assert seg[2, 3] == cost[2, 2]
    assert np.isinf(seg[2, 2]) and np.isinf(seg[3, 1])


def test_schedule_drift_always_counts_step_zero_and_drops_outside_entries() -> None:
    cost = _random_cost(np.random.default_rng(7), 6)
    assert schedule_drift(cost, [3]) == pytest.approx(_drift_by_definition(cost, (0, 3)))
    assert schedule_drift(cost, [0, 3, 9, -1]) == pytest.approx(_drift_by_definition(cost, (0, 3)))


@pytest.mark.parametrize("k", [0, 5, -1])
def test_bad_budget_is_an_error(k: int) -> None:
    with pytest.raises(CatomeError):
        optimal_checkpoints(np.zeros((4, 4)), k)


def test_bad_cost_matrix_is_an_error() -> None:
    with pytest.raises(CatomeError):
        optimal_checkpoints(np.zeros((3, 4)), 1)
    bad = np.zeros((3, 3))
    bad[0, 2] = np.nan
    with pytest.raises(CatomeError):
        optimal_checkpoints(bad, 2)


@pytest.mark.parametrize("step_base", [0, 1])
def test_paper_list_runs_where_the_schedule_fires(step_base: int) -> None:
    listed = (0, 8, 11, 13, 20, 25, 30, 35, 45, 46, 47, 48, 49)  # CONFIG_3
    loops = schedule_loop_indices(parse_schedule("config3", step_base), 51)
    expect = sorted({0} | {e - step_base for e in listed if e - step_base >= 0})
    assert list(loops) == expect
    assert len(loops) == 13


def test_to_step_numbers() -> None:
    assert to_step_numbers([0, 4, 9], 0) == (0, 4, 9)
    assert to_step_numbers([9, 0, 4], 1) == (1, 5, 10)
    with pytest.raises(CatomeError):
        to_step_numbers([0], 2)


def _synthetic_analysis(t: int = 12, seed: int = 3) -> PairAnalysis:
    rng = np.random.default_rng(seed)
    dist = rng.random((2, t, t))
    dist = (dist + dist.transpose(0, 2, 1)) / 2
    for d in dist:
        np.fill_diagonal(d, 0.0)
    cons = np.full((t, 2), np.nan)
    cons[1:] = np.stack([np.diagonal(d, 1) for d in dist], axis=1)
    sites = (MergeSite(0, "down_blocks.0.attentions.0.transformer_blocks.0", 1),
             MergeSite(1, "up_blocks.3.attentions.0.transformer_blocks.0", 1))
    return PairAnalysis(TrackingConfig(steps=t - 1), sites, ((4, 4), (4, 4)), tuple(range(t, 0, -1)), dist, cons,
                        np.zeros((1, t, 2), dtype=np.int64), 0.5, "synthetic")


@pytest.mark.parametrize("budget", [1, 4, 12])
def test_proposal_numbering_follows_step_base(budget: int) -> None:
    analysis = _synthetic_analysis()
    base0, base1 = analysis.propose(budget, 0), analysis.propose(budget, 1)
    assert base0.checkpoints[0] == 0 and base1.checkpoints[0] == 1
    assert base1.checkpoints == tuple(c + 1 for c in base0.checkpoints)
    assert base0.drift == base1.drift
    for score in (base0, base1):
        schedule = score.schedule()
        fires = [i for i in range(analysis.num_calls) if schedule.is_checkpoint(i)]
        assert fires == list(score.loop_indices)  # the schedule fires exactly where the DP put checkpoints
        assert analysis.evaluate(schedule).drift == pytest.approx(score.drift)


def test_compare_scores_the_paper_lists() -> None:
    analysis = _synthetic_analysis()
    scores = analysis.compare(4, 1)
    names = [s.name for s in scores]
    assert names == ["auto:4", "uniform:4", "config1", "config2", "config3", "config4"]
    best = scores[0].drift
    for s in scores:
        assert s.best_drift is not None and s.best_drift <= s.drift + 1e-12
        if s.num_checkpoints == 4:
            assert best <= s.drift + 1e-12
    with pytest.raises(CatomeError):
        analysis.propose(0)
    with pytest.raises(CatomeError):
        analysis.propose(analysis.num_calls + 1)
