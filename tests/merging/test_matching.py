"""match_tokens + MergePlan against a loop-by-loop reference written from catome-semantics.md.

Every comparison is made in token space after unmerge (never slot by slot):
out = unmerge(f(merge(x))) with a token-wise f, for the implementation and
for the reference, which follows the spec literally: per batch item, per src
token, cosine similarity against every dst, best score with the lowest dst
index on ties, src sorted by score (descending), r counted as the spec says,
merged output = concat(unmerged src in edge order, dst means).
"""

from __future__ import annotations

import math

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.merging import MergePlan, match_tokens, merge_tokens, partition, unmerge_tokens


# -- the reference ------------------------------------------------------------------------
def ref_dst_tokens(grid: tuple[int, int], stride: tuple[int, int], offsets: torch.Tensor | None = None) -> list[int]:
    """dst token ids in ascending order: one per full sy x sx cell (top-left, or the cell's drawn offset)."""
    h, w = grid
    sy, sx = stride
    dst = []
    for cy in range(h // sy):
        for cx in range(w // sx):
            oy, ox = (0, 0) if offsets is None else divmod(int(offsets[cy, cx]), sx)
            dst.append((cy * sy + oy) * w + (cx * sx + ox))
    return sorted(dst)


def ref_count(node_max: list[list[float]], n: int, num_src: int, threshold=None, ratio=None, num_merged=None) -> int:
    if threshold is not None:
        if threshold >= 1.0:
            return 0
        return max(sum(1 for v in row if v >= threshold) for row in node_max)
    if ratio is not None:
        return min(int(n * ratio), num_src)
    return min(num_merged, num_src)


def ref_merge_apply_unmerge(x: torch.Tensor, metric: torch.Tensor, grid, stride=(2, 2), *, threshold=None,
                            ratio=None, num_merged=None, f=lambda y: y, offsets=None) -> tuple[torch.Tensor, int]:
    """The spec, with loops, in float64: returns (unmerge(f(merge(x))), r)."""
    b, n, c = x.shape
    dst = ref_dst_tokens(grid, stride, offsets)
    dst_set = set(dst)
    src = [t for t in range(n) if t not in dst_set]
    m = metric.double()
    xd = x.double()
    node_max: list[list[float]] = []
    node_idx: list[list[int]] = []
    for bi in range(b):
        maxes, idxs = [], []
        for s in src:
            best, best_j = -math.inf, -1
            for j, d in enumerate(dst):
                sim = float(torch.dot(m[bi, s], m[bi, d]) / (m[bi, s].norm() * m[bi, d].norm()))
                if sim > best:  # strict: ties keep the lowest dst index
                    best, best_j = sim, j
            maxes.append(best)
            idxs.append(best_j)
        node_max.append(maxes)
        node_idx.append(idxs)
    r = ref_count(node_max, n, len(src), threshold, ratio, num_merged) if dst and src else 0
    out = torch.empty(b, n, c, dtype=torch.float64)
    for bi in range(b):
        order = sorted(range(len(src)), key=lambda i: -node_max[bi][i])  # stable: equal scores keep src order
        merged, unmerged = order[:r], order[r:]
        dst_rows = [xd[bi, d].clone() for d in dst]
        counts = [1] * len(dst)
        for i in merged:
            dst_rows[node_idx[bi][i]] += xd[bi, src[i]]
            counts[node_idx[bi][i]] += 1
        rows = [xd[bi, src[i]] for i in unmerged] + [row / cnt for row, cnt in zip(dst_rows, counts)]
        y = f(torch.stack(rows).unsqueeze(0)).squeeze(0) if rows else torch.empty(0, c, dtype=torch.float64)
        for k, i in enumerate(unmerged):
            out[bi, src[i]] = y[k]
        for j, d in enumerate(dst):
            out[bi, d] = y[len(unmerged) + j]
        for i in merged:
            out[bi, src[i]] = y[len(unmerged) + node_idx[bi][i]]
    return out, r


def token_fn(y: torch.Tensor) -> torch.Tensor:
    """A token-wise nonlinear function (the stand-in for attention between merge and unmerge)."""
    return torch.sin(3.0 * y) + 0.5 * y * y.sum(dim=-1, keepdim=True) / y.shape[-1]


def smooth_metric(batch: int, grid: tuple[int, int], channels: int, seed: int, blur: int = 3) -> torch.Tensor:
    """[B, N, C] tokens that vary smoothly over the grid (many high similarities) plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    img = torch.randn(batch, channels, h, w, generator=gen)
    img = torch.nn.functional.avg_pool2d(img, blur, stride=1, padding=blur // 2, count_include_pad=False)
    img = img + 0.1 * torch.randn(batch, channels, h, w, generator=gen) + 0.3
    return img.flatten(2).transpose(1, 2).contiguous()


def impl_out(x, metric, grid, stride=(2, 2), f=token_fn, **kw) -> tuple[torch.Tensor, MergePlan]:
    plan = match_tokens(metric, grid, stride=stride, **kw)
    plan.validate(x.shape[0], x.shape[1])
    return plan.unmerge(f(plan.merge(x))), plan


# -- threshold mode -----------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("grid,stride", [((8, 8), (2, 2)), ((7, 9), (2, 2)), ((5, 6), (2, 2)), ((9, 8), (3, 2))])
def test_threshold_matches_reference(threshold, grid, stride):
    metric = smooth_metric(3, grid, 16, seed=grid[0] * 100 + grid[1] * 10 + stride[0])
    x = metric  # as in the block: the metric is the block input
    out, plan = impl_out(x, metric, grid, stride, threshold=threshold)
    ref, r = ref_merge_apply_unmerge(x, metric, grid, stride, threshold=threshold, f=token_fn)
    assert plan.num_merged == r
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    if threshold >= 1.0:
        assert r == 0 and plan.is_identity


def test_threshold_cases_actually_merge():
    """The threshold sweep above is not vacuous: smooth metrics merge a lot at 0.5 and little at 0.99."""
    metric = smooth_metric(3, (8, 8), 16, seed=5)
    rs = [match_tokens(metric, (8, 8), threshold=t).num_merged for t in (0.5, 0.7, 0.9, 0.99)]
    assert rs[0] > 0 and rs == sorted(rs, reverse=True) and rs[0] > rs[-1]


def test_batch_items_with_different_counts_use_max_r():
    grid = (6, 6)
    smooth = smooth_metric(1, grid, 16, seed=1, blur=5)
    noisy = torch.randn(1, 36, 16, generator=torch.Generator().manual_seed(2))
    metric = torch.cat([noisy, smooth, noisy.flip(1)])
    per_item = [match_tokens(metric[i: i + 1], grid, threshold=0.8).num_merged for i in range(3)]
    assert len(set(per_item)) > 1, "the test needs items with different counts"
    out, plan = impl_out(metric, metric, grid, threshold=0.8)
    assert plan.num_merged == max(per_item)
    ref, r = ref_merge_apply_unmerge(metric, metric, grid, threshold=0.8, f=token_fn)
    assert r == max(per_item)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 2, 5, 8])
def test_batch_sizes(batch):
    grid = (6, 8)
    metric = smooth_metric(batch, grid, 8, seed=batch)
    x = torch.randn(batch, 48, 12, generator=torch.Generator().manual_seed(10 + batch))  # x differs from metric
    out, plan = impl_out(x, metric, grid, threshold=0.7)
    ref, r = ref_merge_apply_unmerge(x, metric, grid, threshold=0.7, f=token_fn)
    assert plan.num_merged == r and plan.batch_size == batch
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# -- ratio and forced counts --------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.7])
@pytest.mark.parametrize("grid", [(8, 8), (7, 9)])
def test_ratio_matches_reference(ratio, grid):
    metric = torch.randn(2, grid[0] * grid[1], 16, generator=torch.Generator().manual_seed(3))
    out, plan = impl_out(metric, metric, grid, ratio=ratio)
    ref, r = ref_merge_apply_unmerge(metric, metric, grid, ratio=ratio, f=token_fn)
    num_src = grid[0] * grid[1] - (grid[0] // 2) * (grid[1] // 2)
    assert plan.num_merged == r == min(int(grid[0] * grid[1] * ratio), num_src)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_merged", [0, 1, 10, 10_000])
def test_forced_counts_including_zero_and_all_src(num_merged):
    grid = (7, 9)
    num_src = 63 - 3 * 4
    metric = torch.randn(2, 63, 8, generator=torch.Generator().manual_seed(4))
    out, plan = impl_out(metric, metric, grid, num_merged=num_merged)
    ref, r = ref_merge_apply_unmerge(metric, metric, grid, num_merged=num_merged, f=token_fn)
    assert plan.num_merged == r == min(num_merged, num_src)
    assert plan.num_kept == 63 - r
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    if num_merged >= num_src:  # every src merged: only the dst tokens remain
        assert plan.num_kept == 12


def test_r_zero_is_bit_exact_identity():
    metric = torch.randn(2, 64, 8)
    plan = match_tokens(metric, (8, 8), num_merged=0)
    assert plan.is_identity
    assert plan.merge(metric) is metric
    assert plan.unmerge(metric) is metric
    assert torch.equal(plan.keep_idx[0], torch.arange(64))
    # written as the one self-merge (no empty tensor reaches a graph), and exact through merge_tokens too
    assert plan.src_idx.tolist() == plan.slot_idx.tolist() == [[0], [0]] and plan.num_src_rows == 1
    assert torch.equal(unmerge_tokens(merge_tokens(metric, *plan.tensors()[:4]), plan.unmerge_idx), metric)


def test_ties_go_to_the_lowest_dst_index():
    """A src exactly as similar to several dst must merge into the first of them."""
    grid = (4, 4)
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(1, 16, 8, generator=gen)
    dst = ref_dst_tokens(grid, (2, 2))  # [0, 2, 8, 10]
    metric[0, 2] = metric[0, 0] * 2.0  # dst 1 has the same direction as dst 0
    metric[0, 10] = metric[0, 0]  # and dst 3 too
    metric[0, 5] = metric[0, 0] * 0.5  # src 5 ties between dst 0, 1 and 3 (similarity 1)
    plan = match_tokens(metric, grid, num_merged=1)
    assert plan.src_idx.tolist() == [[5]]
    slot_of_dst0 = plan.num_kept - len(dst)  # dst follow the unmerged src, in ascending order
    assert plan.slot_idx.tolist() == [[slot_of_dst0]]
    x = torch.randn(1, 16, 4, generator=gen)
    out, _ = impl_out(x, metric, grid, num_merged=1)
    ref, _ = ref_merge_apply_unmerge(x, metric, grid, num_merged=1, f=token_fn)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_src_order_ties_keep_token_order():
    """Equal node_max values are sorted stably (earlier src first), which decides who is merged at the cut."""
    grid = (2, 4)
    metric = torch.zeros(1, 8, 2)
    metric[..., 0] = 1.0  # every token identical: every score is 1
    plan = match_tokens(metric, grid, num_merged=2)
    src, _ = partition(grid)
    assert plan.src_idx.tolist() == [src[:2].tolist()]


# -- dtypes -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_merge_in_low_precision(dtype, tol):
    grid = (8, 8)
    metric = smooth_metric(2, grid, 16, seed=7)
    plan = match_tokens(metric, grid, threshold=0.7)
    assert plan.num_merged > 0
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(8))
    merged = plan.merge(x.to(dtype))
    assert merged.dtype == dtype
    out = plan.unmerge(merged)
    ref, r = ref_merge_apply_unmerge(x, metric, grid, threshold=0.7)
    assert r == plan.num_merged
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matching_on_a_low_precision_metric(dtype):
    grid = (6, 6)
    metric = smooth_metric(2, grid, 16, seed=9)
    plan = match_tokens(metric.to(dtype), grid, ratio=0.5)
    plan.validate(2, 36)
    assert plan.num_merged == 18 and plan.weight.dtype == torch.float32
    plan_t = match_tokens(metric.to(dtype), grid, threshold=0.7)
    plan_t.validate(2, 36)


# -- random dst ---------------------------------------------------------------------------
def test_random_dst_matches_reference_with_the_same_draw():
    grid, stride = (7, 9), (2, 2)
    metric = smooth_metric(2, grid, 16, seed=11)
    gen = torch.Generator().manual_seed(123)
    offsets = torch.randint(stride[0] * stride[1], (grid[0] // 2, grid[1] // 2),
                            generator=torch.Generator().manual_seed(123))
    out, plan = impl_out(metric, metric, grid, threshold=0.7, generator=gen)
    ref, r = ref_merge_apply_unmerge(metric, metric, grid, threshold=0.7, f=token_fn, offsets=offsets)
    assert plan.num_merged == r
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_random_dst_partition_properties():
    grid, stride = (7, 9), (2, 2)
    src0, dst0 = partition(grid, stride)
    draws = []
    for seed in range(4):
        src, dst = partition(grid, stride, torch.Generator().manual_seed(seed))
        assert dst.numel() == 12 and src.numel() == 63 - 12
        assert sorted(torch.cat([src, dst]).tolist()) == list(range(63))
        cells = {(int(d) // 9 // 2, int(d) % 9 // 2) for d in dst}
        assert len(cells) == 12 and all(cy < 3 and cx < 4 for cy, cx in cells)  # one per full cell, none in the border
        draws.append(dst.tolist())
    again = partition(grid, stride, torch.Generator().manual_seed(0))[1].tolist()
    assert again == draws[0]
    assert any(d != dst0.tolist() for d in draws)


# -- input errors -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one"),
    (dict(threshold=0.7, ratio=0.5), "exactly one"),
    (dict(threshold=1.5), "threshold"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(ratio=1.0), "ratio"),
    (dict(ratio=-0.1), "ratio"),
    (dict(num_merged=-1), "num_merged"),
])
def test_bad_modes_are_rejected(kwargs, match):
    with pytest.raises(CatomeError, match=match):
        match_tokens(torch.randn(1, 16, 4), (4, 4), **kwargs)


def test_bad_shapes_are_rejected():
    with pytest.raises(CatomeError, match="grid"):
        match_tokens(torch.randn(1, 15, 4), (4, 4), threshold=0.7)
    with pytest.raises(CatomeError, match=r"\[B, N, C\]"):
        match_tokens(torch.randn(16, 4), (4, 4), threshold=0.7)


# -- plan validation ----------------------------------------------------------------------
def _corrupt(plan: MergePlan, **changes) -> MergePlan:
    fields = {name: getattr(plan, name) for name in ("keep_idx", "src_idx", "slot_idx", "weight", "unmerge_idx",
                                                      "num_merged")}
    fields.update(changes)
    return MergePlan(**fields)


@pytest.fixture
def good_plan() -> MergePlan:
    metric = smooth_metric(2, (6, 6), 8, seed=12)
    plan = match_tokens(metric, (6, 6), num_merged=10)
    plan.validate(2, 36)
    return plan


def test_identity_plan_validates():
    MergePlan.identity(3, 20).validate(3, 20)


@pytest.mark.parametrize("name,make,match", [
    ("keep out of range", lambda p: _corrupt(p, keep_idx=p.keep_idx.clone().index_fill_(1, torch.tensor([0]), 36)),
     "keep_idx"),
    ("negative src", lambda p: _corrupt(p, src_idx=p.src_idx.clone().index_fill_(1, torch.tensor([0]), -1)),
     "src_idx"),
    ("slot out of range", lambda p: _corrupt(p, slot_idx=p.slot_idx + p.num_kept), "slot_idx"),
    ("unmerge out of range", lambda p: _corrupt(p, unmerge_idx=p.unmerge_idx + p.num_kept), "unmerge_idx"),
    ("zero weight", lambda p: _corrupt(p, weight=torch.zeros_like(p.weight)), "weight"),
    ("nan weight", lambda p: _corrupt(p, weight=torch.full_like(p.weight, float("nan"))), "weight"),
    ("duplicate token", lambda p: _corrupt(p, src_idx=p.keep_idx[:, :p.num_merged].clone()), "exactly once"),
    ("wrong dtype", lambda p: _corrupt(p, keep_idx=p.keep_idx.int()), "keep_idx"),
    ("wrong shape", lambda p: _corrupt(p, weight=p.weight[:, 1:]), "weight"),
    ("r too large", lambda p: _corrupt(p, num_merged=36), "r="),
])
def test_corrupted_plans_are_rejected(good_plan, name, make, match):
    bad = make(good_plan)
    with pytest.raises(CatomeError, match=match):
        bad.validate(2, 36)


def test_plan_for_other_inputs_is_rejected(good_plan):
    with pytest.raises(CatomeError, match="batch"):
        good_plan.validate(3, 36)
    with pytest.raises(CatomeError, match="tokens"):
        good_plan.validate(2, 49)


# -- CUDA ---------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_matches_cpu_in_token_space():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; none is present")
    grid = (16, 12)
    metric = smooth_metric(2, grid, 32, seed=13)
    for kw in (dict(threshold=0.7), dict(ratio=0.5), dict(num_merged=0)):
        out_cpu, plan_cpu = impl_out(metric, metric, grid, **kw)
        plan_gpu = match_tokens(metric.cuda(), grid, **kw)
        plan_gpu.validate(2, grid[0] * grid[1])
        assert plan_gpu.keep_idx.is_cuda and plan_gpu.num_merged == plan_cpu.num_merged
        out_gpu = plan_gpu.unmerge(token_fn(plan_gpu.merge(metric.cuda())))
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-4, rtol=1e-4)
    for dtype in (torch.float16, torch.bfloat16):
        plan = match_tokens(metric.cuda().to(dtype), grid, threshold=0.7)
        plan.validate(2, grid[0] * grid[1])
