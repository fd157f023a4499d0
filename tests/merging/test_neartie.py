"""Plan agreement in token space: near-ties explained, real differences named."""

from __future__ import annotations

import math

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.merging import MergePlan, match_tokens, partition
from catome_export.merging.neartie import (KIND_A_ONLY, KIND_B_ONLY, KIND_DST, KIND_NOT_DST, KIND_R,
                                           compare_plans, score_rounding_bound, token_destinations, unit_roundoff)

FP32 = 2.0 ** -24
T = 0.9
"""Threshold for the smooth random metrics below (about a quarter of their src tokens score above it)."""


def plan_from_destinations(dest: torch.Tensor, src_ids: torch.Tensor) -> MergePlan:
    """A valid plan for a [B, N] token -> dst token map (-1: kept).

    Unmerged src first, then the dst, as matching lays them out.
    """
    b, n = dest.shape
    r = int((dest[0] >= 0).sum())
    keep, srcs, slots, weights, unmerges = [], [], [], [], []
    for row in dest.tolist():
        merged = [t for t in range(n) if row[t] >= 0]
        kept = [t for t in src_ids.tolist() if row[t] < 0] + [t for t in range(n) if t not in src_ids.tolist()]
        slot_of = {t: k for k, t in enumerate(kept)}
        slot = [slot_of[row[t]] for t in merged]
        count = [1] * len(kept)
        for s in slot:
            count[s] += 1
        unmerge = [slot_of[t] if t in slot_of else slot_of[row[t]] for t in range(n)]
        keep.append(kept), srcs.append(merged), slots.append(slot), unmerges.append(unmerge)
        weights.append([1.0 / c for c in count])
    plan = MergePlan(keep_idx=torch.tensor(keep), src_idx=torch.tensor(srcs, dtype=torch.int64).reshape(b, r),
                     slot_idx=torch.tensor(slots, dtype=torch.int64).reshape(b, r), weight=torch.tensor(weights),
                     unmerge_idx=torch.tensor(unmerges), num_merged=r)
    plan.validate()
    return plan


def near_tie_inputs(tilt: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x4 grid (dst tokens 0 and 2): src 1 is equally close to both dst, tilted one way on each side."""
    x = torch.zeros(1, 8, 8, dtype=torch.float64)
    x[0, 0, 0] = 1.0                       # dst 0
    x[0, 2, 1] = 1.0                       # dst 2
    x[0, 1, :3] = torch.tensor([1.0, 1.0, 0.3])   # src 1: score 0.686 with each dst
    for k, tok in enumerate((3, 4, 5, 6, 7)):
        x[0, tok, 3 + k] = 1.0             # other src: orthogonal to both dst (score 0)
    x_a, x_b = x.clone(), x.clone()
    x_a[0, 1, 0] += tilt                   # side a leans to dst 0
    x_b[0, 1, 1] += tilt                   # side b leans to dst 2
    return x_a.float(), x_b.float()


def smooth_metric(seed: int, grid=(8, 8), channels: int = 16, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, channels, *grid, generator=gen)
    img = torch.nn.functional.avg_pool2d(img, 3, stride=1, padding=1, count_include_pad=False) + 0.3
    return img.flatten(2).transpose(1, 2).contiguous()


def test_rounding_bound_is_about_2c_plus_4_ulps_and_holds():
    assert score_rounding_bound(320, FP32) == pytest.approx((2 * 320 + 4) * FP32, rel=0.01)
    assert math.isinf(score_rounding_bound(4096, 2.0 ** -11))
    # the bound holds for real fp32 scores against float64 ones
    x = torch.randn(2, 512, 320, generator=torch.Generator().manual_seed(3)) * 5.0
    m32 = x / x.norm(dim=-1, keepdim=True)
    s32 = m32 @ m32.transpose(-1, -2)
    x64 = x.double()
    u64 = x64 / x64.norm(dim=-1, keepdim=True)
    worst = float((s32.double() - u64 @ u64.transpose(-1, -2)).abs().max())
    assert 0 < worst <= score_rounding_bound(320, FP32)


def test_unit_roundoff_per_dtype():
    assert unit_roundoff(torch.float32, "cpu") == FP32
    assert unit_roundoff(torch.float16) == 2.0 ** -11
    assert unit_roundoff(torch.bfloat16) == 2.0 ** -8
    assert unit_roundoff(torch.float64) == 2.0 ** -53


def test_identical_plans_agree():
    x = smooth_metric(0)
    plan = match_tokens(x, (8, 8), threshold=T)
    src, dst = partition((8, 8))
    result = compare_plans(x, plan, x.clone(), plan, src, dst, threshold=T, roundoff=FP32)
    assert result.same and not result.flips and not result.unexplained and result.max_input_diff == 0.0


def test_forced_near_tie_is_a_reported_flip():
    x_a, x_b = near_tie_inputs()
    plan_a = match_tokens(x_a, (2, 4), threshold=0.5)
    plan_b = match_tokens(x_b, (2, 4), threshold=0.5)
    assert plan_a.num_merged == plan_b.num_merged == 1
    assert token_destinations(plan_a)[0, 1] == 0 and token_destinations(plan_b)[0, 1] == 2  # the argmax flipped
    src, dst = partition((2, 4))
    result = compare_plans(x_a, plan_a, x_b, plan_b, src, dst, threshold=0.5, roundoff=FP32)
    assert not result.same and not result.unexplained and result.r_explained
    (flip,) = result.flips
    assert (flip.kind, flip.batch, flip.token, flip.dst_a, flip.dst_b) == (KIND_DST, 0, 1, 0, 2)
    assert abs(flip.gap) <= flip.bound and "near-tie" in flip.detail


def test_a_clearly_worse_dst_is_not_explained():
    x_b = smooth_metric(1, batch=2)
    x_a = x_b + 1e-6 * torch.randn(x_b.shape, generator=torch.Generator().manual_seed(9))
    src, dst = partition((8, 8))
    plan_b = match_tokens(x_b, (8, 8), threshold=T)
    dest = token_destinations(match_tokens(x_a, (8, 8), threshold=T))
    # plant: batch item 1's first merged src goes to its worst dst instead of its best
    tok = int((dest[1] >= 0).nonzero()[0])
    u = x_a[1] / x_a[1].norm(dim=-1, keepdim=True)
    worst = int(dst[(u[dst] @ u[tok]).argmin()])
    assert worst != int(dest[1, tok])
    dest[1, tok] = worst
    planted = plan_from_destinations(dest, src)
    result = compare_plans(x_a, planted, x_b, plan_b, src, dst, threshold=T, roundoff=FP32)
    bad = [d for d in result.unexplained if d.token == tok]
    assert len(bad) == 1 and bad[0].kind == KIND_DST and bad[0].batch == 1 and bad[0].dst_a == worst
    assert abs(bad[0].gap) > 10 * bad[0].bound and f"src {tok}" in bad[0].detail


def test_a_non_dst_destination_is_not_explained():
    x = smooth_metric(2)
    src, dst = partition((8, 8))
    plan = match_tokens(x, (8, 8), threshold=T)
    dest = token_destinations(plan)
    tok = int((dest[0] >= 0).nonzero()[0])
    other_src = next(t for t in src.tolist() if dest[0, t] < 0)
    dest[0, tok] = other_src
    result = compare_plans(x, plan_from_destinations(dest, src), x, plan, src, dst, threshold=T, roundoff=FP32)
    assert [d.kind for d in result.unexplained] == [KIND_NOT_DST]


def test_a_token_at_the_threshold_may_be_merged_on_one_side_only():
    x_a, x_b = near_tie_inputs(tilt=0.0)
    t = float(torch.nn.functional.cosine_similarity(x_b[0, 1].double(), x_b[0, 0].double(), dim=0))
    src, dst = partition((2, 4))
    plan_a = match_tokens(x_a, (2, 4), threshold=t - 1e-7)      # merges src 1
    plan_b = match_tokens(x_b, (2, 4), threshold=t + 1e-7)      # does not
    assert plan_a.num_merged == 1 and plan_b.num_merged == 0
    result = compare_plans(x_a, plan_a, x_b, plan_b, src, dst, threshold=t, roundoff=FP32)
    assert not result.unexplained and result.r_explained
    assert [(d.kind, d.token) for d in result.flips] == [(KIND_A_ONLY, 1)]


def test_a_token_far_from_the_threshold_merged_on_one_side_only_fails():
    x = smooth_metric(3)
    src, dst = partition((8, 8))
    plan = match_tokens(x, (8, 8), threshold=T)
    assert plan.num_merged >= 2
    dest = token_destinations(plan)
    # drop the best-scoring merged src (far above t) and merge the worst-scoring src instead: r stays the same
    best = int(plan.src_idx[0, 0])
    u = x[0] / x[0].norm(dim=-1, keepdim=True)
    node_max = (u[src] @ u[dst].T).max(dim=-1)
    worst_pos = int(node_max.values.argmin())
    worst = int(src[worst_pos])
    dest[0, worst] = int(dst[node_max.indices[worst_pos]])
    dest[0, best] = -1
    result = compare_plans(x, plan_from_destinations(dest, src), x, plan, src, dst, threshold=T, roundoff=FP32)
    kinds = {(d.kind, d.token) for d in result.unexplained}
    assert kinds == {(KIND_A_ONLY, worst), (KIND_B_ONLY, best)}


def test_r_differences():
    x = smooth_metric(4)
    src, dst = partition((8, 8))
    plan = match_tokens(x, (8, 8), threshold=T)
    fewer = match_tokens(x, (8, 8), num_merged=plan.num_merged - 3)
    result = compare_plans(x, fewer, x, plan, src, dst, threshold=T, roundoff=FP32)
    assert not result.r_explained and any(d.kind == KIND_R for d in result.unexplained)
    # with a fixed count (ratio), r cannot differ at all
    result = compare_plans(x, fewer, x, plan, src, dst, threshold=None, roundoff=FP32)
    assert not result.r_explained


def test_r_zero_placeholder_self_merge_reads_as_nothing_merged():
    n = 8
    ar = torch.arange(n).unsqueeze(0)
    weight = torch.ones(1, n)
    weight[0, 0] = 0.5
    placeholder = MergePlan(keep_idx=ar, src_idx=torch.zeros(1, 1, dtype=torch.int64),
                            slot_idx=torch.zeros(1, 1, dtype=torch.int64), weight=weight, unmerge_idx=ar.clone(),
                            num_merged=0)
    assert bool((token_destinations(placeholder) == -1).all())
    x = near_tie_inputs()[0]
    src, dst = partition((2, 4))
    result = compare_plans(x, placeholder, x, MergePlan.identity(1, n), src, dst, threshold=0.9, roundoff=FP32)
    assert result.same


def _exact_node_max(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    u = x.double() / x.double().norm(dim=-1, keepdim=True)
    return (u[:, src] @ u[:, dst].transpose(-1, -2)).amax(dim=-1)[0]


def test_rounded_r_differing_by_a_near_tie_at_the_threshold_is_explained():
    """q = 4, t exactly at the 8th best score: one side counts 8 (r = 8), the other 7 (r = 4)."""
    x = smooth_metric(5, grid=(16, 16))
    src, dst = partition((16, 16))
    ranked = _exact_node_max(x, src, dst).sort(descending=True).values
    t = float(ranked[7])
    bound = 2 * (score_rounding_bound(x.shape[-1], FP32) + 4 * score_rounding_bound(x.shape[-1], 2.0 ** -53))
    assert ranked[6] - t > bound and t - ranked[8] > bound  # only the 8th score is near t
    eight, four = match_tokens(x, (16, 16), num_merged=8), match_tokens(x, (16, 16), num_merged=4)
    result = compare_plans(x, eight, x.clone(), four, src, dst, threshold=t, roundoff=FP32, multiple=4)
    assert result.r_explained and not result.unexplained, [d.detail for d in result.unexplained]
    (r_diff,) = [d for d in result.differences if d.kind == KIND_R]
    assert "[4, 8]" in r_diff.detail and "multiples of 4" in r_diff.detail
    assert sorted(d.kind for d in result.flips) == [KIND_A_ONLY] * 4  # the 5th..8th best, merged on one side
    # the same plans compared as if r had not been rounded: 4 is no count the scores allow
    unrounded = compare_plans(x, eight, x.clone(), four, src, dst, threshold=t, roundoff=FP32)
    assert not unrounded.r_explained


def test_rounded_r_differences_that_are_not_near_ties_fail():
    x = smooth_metric(5, grid=(16, 16))
    src, dst = partition((16, 16))
    t = float(_exact_node_max(x, src, dst).sort(descending=True).values[7])
    eight = match_tokens(x, (16, 16), num_merged=8)
    # a whole multiple fewer (0 instead of 4 or 8), and a count that is no multiple of q at all
    for other in (0, 6):
        result = compare_plans(x, eight, x.clone(), match_tokens(x, (16, 16), num_merged=other), src, dst,
                               threshold=t, roundoff=FP32, multiple=4)
        assert not result.r_explained, other
        (r_diff,) = [d for d in result.unexplained if d.kind == KIND_R]
        assert "not a near-tie" in r_diff.detail
    # far from any score: t midway between the 4th and 5th best, both sides r = 4 only
    ranked = _exact_node_max(x, src, dst).sort(descending=True).values
    far = float(ranked[3] + ranked[4]) / 2
    result = compare_plans(x, eight, x.clone(), match_tokens(x, (16, 16), num_merged=4), src, dst,
                           threshold=far, roundoff=FP32, multiple=4)
    assert not result.r_explained
    with pytest.raises(CatomeError, match="r_multiple"):
        compare_plans(x, eight, x.clone(), eight, src, dst, threshold=t, roundoff=FP32, multiple=0)
