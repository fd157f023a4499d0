"""Pair sets of a merge and their Jaccard distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from catome_export.analysis.pairs import (
    consecutive_distances,
    distance_matrix,
    jaccard_distance,
    map_distance,
    pair_map,
    pair_sets,
)
from catome_export.errors import CatomeError
from catome_export.merging import MergePlan, match_tokens

GRID = (6, 6)


def _plan(seed: int, *, batch: int = 2, num_merged: int | None = None, threshold: float | None = None) -> MergePlan:
    gen = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, GRID[0] * GRID[1], 8, generator=gen)
    if threshold is not None:
        return match_tokens(metric, GRID, threshold=threshold)
    return match_tokens(metric, GRID, num_merged=num_merged)


def _pairs_via_unmerge(plan: MergePlan) -> list[set[tuple[int, int]]]:
    """Pairs read from the unmerge map: a token whose slot holds another token is a merged src."""
    out = []
    for b in range(plan.batch_size):
        keep = plan.keep_idx[b].tolist()
        pairs = set()
        for token, slot in enumerate(plan.unmerge_idx[b].tolist()):
            if keep[slot] != token:
                pairs.add((token, keep[slot]))
        out.append(pairs)
    return out


def test_jaccard_identical_disjoint_and_empty() -> None:
    a = {(1, 2), (3, 4), (5, 4)}
    assert jaccard_distance(a, set(a)) == 0.0
    assert jaccard_distance(a, {(7, 8), (9, 8)}) == 1.0
    assert jaccard_distance(set(), set()) == 0.0
    assert jaccard_distance(a, set()) == 1.0
    assert jaccard_distance(set(), a) == 1.0
    assert jaccard_distance({1, 2, 3}, {2, 3, 4}) == pytest.approx(1 - 2 / 4)


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, 20)), st.sets(st.integers(0, 20)), st.sets(st.integers(0, 20)))
def test_jaccard_is_a_metric(a: set[int], b: set[int], c: set[int]) -> None:
    d = jaccard_distance(a, b)
    assert 0.0 <= d <= 1.0
    assert d == jaccard_distance(b, a)
    assert (d == 0.0) == (a == b)
    assert jaccard_distance(a, c) <= d + jaccard_distance(b, c) + 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_map_matches_the_plan(seed: int) -> None:
    plan = _plan(seed, num_merged=11)
    pm = pair_map(plan)
    assert pm.shape == (2, GRID[0] * GRID[1])
    sets = pair_sets(plan)
    assert [set(s) for s in sets] == _pairs_via_unmerge(plan)
    assert all(len(s) == plan.num_merged for s in sets)
    # every dst of a pair is itself kept, never a merged src
    for b, s in enumerate(sets):
        assert all(dst in plan.keep_idx[b].tolist() for _, dst in s)


def test_identity_plan_has_no_pairs() -> None:
    plan = MergePlan.identity(2, 36)
    assert pair_sets(plan) == [frozenset(), frozenset()]
    assert map_distance(pair_map(plan), pair_map(plan)) == 0.0
    assert map_distance(pair_map(plan), pair_map(_plan(0, num_merged=5))) == 1.0


@pytest.mark.parametrize("seeds", [(0, 1), (2, 3), (4, 4)])
def test_map_distance_is_the_mean_of_item_jaccards(seeds: tuple[int, int]) -> None:
    a, b = _plan(seeds[0], threshold=0.3), _plan(seeds[1], threshold=0.5)
    expect = np.mean([jaccard_distance(x, y) for x, y in zip(pair_sets(a), pair_sets(b))])
    assert map_distance(pair_map(a), pair_map(b)) == pytest.approx(expect)


def test_distance_matrix_and_consecutive() -> None:
    plans = [_plan(s % 3, num_merged=4 + s) for s in range(5)]
    maps = torch.stack([pair_map(p) for p in plans])
    d = distance_matrix(maps)
    assert d.shape == (5, 5)
    np.testing.assert_allclose(d, d.T)
    np.testing.assert_allclose(np.diag(d), 0.0)
    for i in range(5):
        for j in range(5):
            assert d[i, j] == pytest.approx(map_distance(maps[i], maps[j]))
    assert d[0, 1] > 0.0  # same metric, one more merge: not the same pair set
    cons = consecutive_distances(maps)
    assert np.isnan(cons[0])
    np.testing.assert_allclose(cons[1:], np.diagonal(d, offset=1))


def test_bad_map_shapes_are_errors() -> None:
    with pytest.raises(CatomeError):
        map_distance(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(CatomeError):
        distance_matrix(torch.zeros(2, 4, dtype=torch.int64))
