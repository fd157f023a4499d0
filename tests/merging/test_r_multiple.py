"""Bounded shape variety: r rounded down to a multiple of ``MergeSettings.r_multiple`` (q), in one place."""

from __future__ import annotations

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.merging import (MergeController, MergeSettings, count_merged, match_tokens, parse_schedule,
                                   partition)
from catome_export.merging.matching import round_merged
from catome_export.merging.neartie import token_destinations

GRID = (64, 64)
"""The SD 1.5 top-level grid at 512 px: N = 4096 tokens, 3072 src."""


def smooth_metric(seed: int, grid=GRID, channels: int = 16, batch: int = 2, kernel: int = 5) -> torch.Tensor:
    """Seeded blurred noise as a [B, N, C] metric: self-similar, so thresholds merge a good share."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, channels, *grid, generator=gen)
    img = torch.nn.functional.avg_pool2d(img, kernel, stride=1, padding=kernel // 2, count_include_pad=False) + 0.2
    return img.flatten(2).transpose(1, 2).contiguous()


def assert_same_plan(a, b) -> None:
    assert a.num_merged == b.num_merged
    for name in ("keep_idx", "src_idx", "slot_idx", "weight", "unmerge_idx"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


def test_round_merged():
    assert [round_merged(r, 64) for r in (0, 1, 63, 64, 65, 127, 128, 3071)] == [0, 0, 0, 64, 64, 64, 128, 3008]
    assert [round_merged(r, 1) for r in (0, 1, 63, 3071)] == [0, 1, 63, 3071]
    for bad in (0, -64, 1.5, True, "64", None):
        with pytest.raises(CatomeError, match="r_multiple must be an int >= 1"):
            round_merged(10, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", [{"threshold": 0.8}, {"threshold": 0.95}, {"ratio": 0.37}, {"num_merged": 1000}])
def test_q1_is_todays_matching_bit_for_bit(mode):
    metric = smooth_metric(0)
    today = match_tokens(metric, GRID, **mode)
    assert today.num_merged > 0
    assert_same_plan(match_tokens(metric, GRID, multiple=1, **mode), today)
    # and through the controller that the engine and the eager patch share, with the setting spelled out
    if "num_merged" not in mode:
        settings = MergeSettings(**({"threshold": None} if "ratio" in mode else {}), **mode, r_multiple=1)
        assert settings == MergeSettings(**({"threshold": None} if "ratio" in mode else {}), **mode)
        assert_same_plan(MergeController(settings, 1).compute_plan(metric, GRID), today)


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9, 0.95, 0.97])
def test_q64_merges_the_best_scoring_multiple_of_64(threshold):
    metric = smooth_metric(1)
    raw = match_tokens(metric, GRID, threshold=threshold)
    plan = match_tokens(metric, GRID, threshold=threshold, multiple=64)
    assert plan.num_merged == 64 * (raw.num_merged // 64) and plan.num_merged % 64 == 0
    plan.validate(2, GRID[0] * GRID[1])
    # the same tokens as merging exactly that many by score: the first r of the sort, into their best dst
    best = match_tokens(metric, GRID, num_merged=plan.num_merged)
    assert torch.equal(token_destinations(plan), token_destinations(best))
    if plan.num_merged:  # every merged src is among the raw plan's merged ones, with the same dst
        dest, dest_raw = token_destinations(plan), token_destinations(raw)
        merged = dest >= 0
        assert torch.equal(dest[merged], dest_raw[merged])


def test_r_below_q_merges_nothing():
    metric = smooth_metric(2)
    node_max = _node_max(metric)
    # a threshold that lets between 1 and 63 src through (max over the batch)
    t = float(node_max.sort(dim=-1, descending=True).values[:, 40].max())
    raw = match_tokens(metric, GRID, threshold=t)
    assert 1 <= raw.num_merged < 64
    plan = match_tokens(metric, GRID, threshold=t, multiple=64)
    assert plan.num_merged == 0
    assert torch.equal(plan.unmerge_idx, torch.arange(GRID[0] * GRID[1]).expand(2, -1))
    x = torch.randn(2, GRID[0] * GRID[1], 8)
    assert torch.equal(plan.unmerge(plan.merge(x)), x)
    # a fixed count below q too
    assert match_tokens(metric, GRID, num_merged=63, multiple=64).num_merged == 0
    assert count_merged(node_max, GRID[0] * GRID[1], ratio=0.01, multiple=64) == 0  # int(4096 * 0.01) = 40


def _node_max(metric: torch.Tensor) -> torch.Tensor:
    src, dst = partition(GRID)
    m = metric / metric.norm(dim=-1, keepdim=True)
    return (m[:, src] @ m[:, dst].transpose(-1, -2)).max(dim=-1).values


def test_distinct_r_per_site_is_bounded_by_n_over_q():
    n = GRID[0] * GRID[1]
    num_src = partition(GRID)[0].numel()
    seen: dict[int, set[int]] = {1: set(), 64: set()}
    for seed in range(4):
        metric = smooth_metric(seed, kernel=3 + 2 * (seed % 3))
        node_max = _node_max(metric)
        # thresholds spread over the scores actually met, as steps and prompts spread them
        ranked = node_max.max(dim=0).values.sort(descending=True).values
        for t in ranked[::23].tolist():
            for q in seen:
                seen[q].add(count_merged(node_max, n, threshold=t, multiple=q))
        for t in (0.7, 0.9):  # and the full matching agrees with the count
            assert match_tokens(metric, GRID, threshold=t, multiple=64).num_merged == \
                count_merged(node_max, n, threshold=t, multiple=64)
    assert all(r % 64 == 0 for r in seen[64])
    assert len(seen[64]) <= num_src // 64 + 1 <= n // 64
    assert len(seen[1]) > n // 64  # without rounding the same inputs meet more shapes than the bound allows


def test_forced_fraction_is_rounded_in_the_controller_too():
    metric = smooth_metric(3)
    settings = MergeSettings(threshold=None, merge_fraction=0.5, schedule=parse_schedule("every_step"),
                             r_multiple=64)
    plan = MergeController(settings, 1).compute_plan(metric, GRID)
    assert plan.num_merged == 64 * (1536 // 64) == 1536
    settings = MergeSettings(threshold=None, merge_fraction=0.3, schedule=parse_schedule("every_step"),
                             r_multiple=100)
    assert MergeController(settings, 1).compute_plan(metric, GRID).num_merged == 900  # round(921.6) = 922 -> 900


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "64", None])
def test_settings_refuse_a_bad_r_multiple_in_one_line(bad):
    with pytest.raises(CatomeError) as info:
        MergeSettings(r_multiple=bad)
    assert "r_multiple must be an int >= 1" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CatomeError, match="r_multiple"):
        match_tokens(smooth_metric(0, grid=(8, 8)), (8, 8), threshold=0.5, multiple=bad)


def test_settings_round_trip_and_old_dicts_load_with_q1():
    settings = MergeSettings(r_multiple=64)
    data = settings.to_dict()
    assert data["r_multiple"] == 64 and MergeSettings.from_dict(data) == settings
    del data["r_multiple"]  # a manifest written before the setting existed
    assert MergeSettings.from_dict(data).r_multiple == 1
