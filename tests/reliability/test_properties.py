"""Property tests of matching and plan validation (hypothesis).

Every plan ``match_tokens`` makes, for any batch, grid (ragged ones
included), stride, metric dtype and merge mode, passes ``validate()`` and
keeps the plan contract; every corrupted plan is rejected by ``validate()``,
which is what stands between a plan and a compiled graph.
"""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install 'catome-export[test]')")

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catome_export.errors import CatomeError
from catome_export.merging import MergePlan, match_tokens

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    """(metric [B, N, C], grid, stride, mode kwargs, dtype)."""
    b = draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    stride = draw(st.sampled_from([(2, 2), (2, 2), (2, 1), (1, 2), (3, 3), (2, 3), (4, 4)]))
    c = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "smooth", "coarse"]))
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        metric = torch.randn(b, h * w, c, generator=gen)
    elif kind == "smooth":  # self-similar tokens: many pairs above usual thresholds
        metric = torch.randn(b, 1, c, generator=gen) + 0.1 * torch.randn(b, h * w, c, generator=gen)
    else:  # few distinct values: exact ties in the similarity scores
        metric = torch.randint(-1, 2, (b, h * w, c), generator=gen).float()
        metric[..., 0] = 1.0  # no all-zero token (cosine similarity is undefined there)
    mode = draw(st.sampled_from(["threshold", "ratio", "num_merged"]))
    if mode == "threshold":
        value = draw(st.one_of(st.just(1.0), st.just(-1.0), st.floats(-1.0, 1.0, allow_nan=False)))
    elif mode == "ratio":
        value = draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)))
    else:
        value = draw(st.integers(0, h * w + 3))
    return metric.to(dtype), (h, w), stride, {mode: value}, dtype


def num_dst(grid: tuple[int, int], stride: tuple[int, int]) -> int:
    """One dst per full sy x sx cell (the spec's count, computed independently)."""
    (h, w), (sy, sx) = grid, stride
    return (h // sy) * (w // sx)


def num_src(grid: tuple[int, int], stride: tuple[int, int]) -> int:
    """Every token that is not a dst (ragged borders included)."""
    return grid[0] * grid[1] - num_dst(grid, stride)


@SETTINGS
@given(cases())
def test_every_plan_keeps_the_contract(case):
    metric, grid, stride, mode, _ = case
    b, n, _ = metric.shape
    plan = match_tokens(metric, grid, stride=stride, **mode)
    plan.validate(b, n)  # shapes, dtypes, ranges, coverage, unmerge and weight consistency
    r = plan.num_merged
    src = num_src(grid, stride) if num_dst(grid, stride) else 0  # no dst: nothing to merge into
    assert 0 <= r <= src
    assert plan.num_kept + r == n and plan.keep_idx.shape == (b, n - r) and plan.src_idx.shape == (b, plan.num_src_rows)
    every = torch.sort(torch.cat([plan.keep_idx, plan.src_idx[:, :r]], dim=1), dim=1).values
    assert torch.equal(every, torch.arange(n).expand(b, -1))  # every token exactly once
    (name, value), = mode.items()
    if name == "threshold" and value >= 1.0:
        assert r == 0
    if name == "ratio":
        assert r == min(int(n * value), src)
    if name == "num_merged":
        assert r == min(value, src)


@pytest.mark.slow
@SETTINGS
@given(cases(), st.integers(-4, 4), st.booleans())
def test_unmerge_of_merge_is_identity_on_a_constant_field(case, exponent, negative):
    """Every token equal: each merged slot averages equal rows, so unmerge(merge(x)) == x (to one rounding)."""
    metric, grid, stride, mode, dtype = case
    b, n, c = metric.shape
    plan = match_tokens(metric, grid, stride=stride, **mode)
    row = torch.full((b, 1, c), (-1.0 if negative else 1.0) * 2.0 ** exponent)
    row[:, :, ::2] *= 2  # not the same value in every channel
    x = row.expand(b, n, c).to(dtype).contiguous()
    merged = plan.merge(x)
    assert merged.shape == (b, n - plan.num_merged, c) and merged.dtype == dtype
    torch.testing.assert_close(plan.unmerge(merged), x, rtol=torch.finfo(dtype).eps, atol=0.0)


@SETTINGS
@given(cases())
def test_unmerge_of_merge_keeps_unmerged_tokens_and_shares_merged_rows(case):
    """Any field: tokens nothing merged into come back bit-exact; a merged src reads its dst's row."""
    metric, grid, stride, mode, _ = case
    b, n, _ = metric.shape
    plan = match_tokens(metric, grid, stride=stride, **mode)
    x = torch.randn(b, n, 5, generator=torch.Generator().manual_seed(n))
    y = plan.unmerge(plan.merge(x))
    counts = torch.ones(b, plan.num_kept)
    counts.scatter_add_(1, plan.slot_idx[:, :plan.num_merged], torch.ones(b, plan.num_merged))
    alone = plan.keep_idx.masked_select(counts == 1).view(-1)
    rows = torch.arange(b).unsqueeze(1).expand(-1, plan.num_kept).masked_select(counts == 1)
    assert torch.equal(y[rows, alone], x[rows, alone])
    if plan.num_merged:
        dst = plan.keep_idx.gather(1, plan.slot_idx)
        torch.testing.assert_close(y.gather(1, plan.src_idx.unsqueeze(-1).expand(-1, -1, 5)),
                                   y.gather(1, dst.unsqueeze(-1).expand(-1, -1, 5)), rtol=0, atol=0)


def _replace(plan: MergePlan, **changes) -> MergePlan:
    fields = {name: getattr(plan, name) for name in ("keep_idx", "src_idx", "slot_idx", "weight", "unmerge_idx",
                                                      "num_merged")}
    fields.update(changes)
    return MergePlan(**fields)


CORRUPTIONS = ("out_of_range", "negative", "dtype", "shape", "duplicate", "count", "unmerge", "weight", "device")


@st.composite
def corrupted(draw):
    """(good plan, corrupted plan, what was done)."""
    metric, grid, stride, _, _ = draw(cases())
    b, n, _ = metric.shape
    src = num_src(grid, stride)
    r = draw(st.integers(1, src)) if src >= 1 and num_dst(grid, stride) >= 1 else 0
    plan = match_tokens(metric.float(), grid, stride=stride, num_merged=r) if r else MergePlan.identity(b, n)
    kind = draw(st.sampled_from(CORRUPTIONS))
    index_names = [name for name in ("keep_idx", "src_idx", "slot_idx", "unmerge_idx") if getattr(plan, name).numel()]
    if kind in ("out_of_range", "negative"):
        name = draw(st.sampled_from(index_names))
        t = getattr(plan, name).clone()
        bound = n if name in ("keep_idx", "src_idx") else plan.num_kept
        pos = draw(st.integers(0, t.numel() - 1))
        t.view(-1)[pos] = bound + draw(st.integers(0, 1000)) if kind == "out_of_range" else -1 - draw(st.integers(0, 5))
        return plan, _replace(plan, **{name: t}), f"{kind} {name}[{pos}]"
    if kind == "dtype":
        name = draw(st.sampled_from(index_names + ["weight"]))
        dt = draw(st.sampled_from([torch.float64, torch.float16]) if name == "weight"
                  else st.sampled_from([torch.int32, torch.float32, torch.int16]))
        return plan, _replace(plan, **{name: getattr(plan, name).to(dt)}), f"{name} as {dt}"
    if kind == "shape":
        name = draw(st.sampled_from(["keep_idx", "src_idx", "slot_idx", "weight", "unmerge_idx"]))
        t = getattr(plan, name)
        how = draw(st.sampled_from(["extra_column", "extra_row", "flat"] + (["drop_column"] if t.shape[1] else [])))
        if how == "extra_column":
            t = torch.cat([t, t.new_zeros(b, 1)], dim=1)
        elif how == "extra_row":
            t = torch.cat([t, t[:1]], dim=0)
        elif how == "flat":
            t = t.reshape(-1)
        else:
            t = t[:, 1:]
        return plan, _replace(plan, **{name: t}), f"{name} {how}"
    if kind == "duplicate" and n >= 2:
        keep, srcs = plan.keep_idx.clone(), plan.src_idx.clone()
        row = draw(st.integers(0, b - 1))
        if plan.num_merged and draw(st.booleans()):
            srcs[row, draw(st.integers(0, plan.num_merged - 1))] = keep[row, draw(st.integers(0, plan.num_kept - 1))]
        elif plan.num_kept >= 2:
            i, j = draw(st.lists(st.integers(0, plan.num_kept - 1), min_size=2, max_size=2, unique=True))
            keep[row, i] = keep[row, j]
        else:
            srcs[row, 0] = srcs[row, -1] if plan.num_merged >= 2 else keep[row, 0]
        return plan, _replace(plan, keep_idx=keep, src_idx=srcs), "duplicated token"
    if kind == "count":
        wrong = draw(st.sampled_from([v for v in (plan.num_merged - 1, plan.num_merged + 1, n, -1)
                                      if v != plan.num_merged]))
        return plan, _replace(plan, num_merged=wrong), f"num_merged {wrong}"
    if kind == "unmerge" and plan.num_kept >= 2:
        u = plan.unmerge_idx.clone()
        row = draw(st.integers(0, b - 1))
        token = plan.keep_idx[row, draw(st.integers(0, plan.num_kept - 1))]
        u[row, token] = (u[row, token] + draw(st.integers(1, plan.num_kept - 1))) % plan.num_kept
        return plan, _replace(plan, unmerge_idx=u), "unmerge to another slot"
    if kind == "weight":
        wt = plan.weight.clone()
        wt.view(-1)[draw(st.integers(0, wt.numel() - 1))] *= draw(st.sampled_from([0.5, 0.0, -1.0, 2.0]))
        return plan, _replace(plan, weight=wt), "weight changed"
    if kind == "device":
        return plan, _replace(plan, weight=plan.weight.to("meta")), "weight on another device"
    # duplicate / unmerge need more tokens than this plan has: shorten a tensor instead
    return plan, _replace(plan, unmerge_idx=plan.unmerge_idx[:, :-1]), "unmerge_idx too short"


@SETTINGS
@given(corrupted())
def test_corrupted_plans_are_rejected(case):
    good, bad, what = case
    good.validate(good.batch_size, good.num_tokens)
    with pytest.raises(CatomeError, match="merge plan"):
        bad.validate(good.batch_size, good.num_tokens)


@SETTINGS
@given(cases(), st.integers(-2, 2), st.integers(-2, 2))
def test_plans_for_other_inputs_are_rejected(case, db, dn):
    metric, grid, stride, mode, _ = case
    b, n, _ = metric.shape
    if (db, dn) == (0, 0) or b + db < 1 or n + dn < 1:
        return
    plan = match_tokens(metric, grid, stride=stride, **mode)
    with pytest.raises(CatomeError, match="does not match the input"):
        plan.validate(b + db, n + dn)
