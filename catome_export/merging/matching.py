"""Bipartite soft matching on a 2-D token grid (ToMe for SD, adaptive CA-ToMe).

Implements steps 1-5 of ``catome-semantics.md``: dst tokens on a stride grid,
cosine similarity of every src against every dst, src sorted by best score,
r from a threshold (max over the batch) or a fixed ratio, and the plan tensors
that merge the first r src into their best dst. Fully vectorised; the only
host read is the scalar r.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from catome_export.checks import check_int
from catome_export.errors import CatomeError
from catome_export.merging.plan import MergePlan


def grid_for_tokens(num_tokens: int, latent_hw: tuple[int, int], max_downsample: int = 1) -> tuple[int, int] | None:
    """The (h, w) grid of a block with ``num_tokens`` tokens, or None if it is not a merge level.

    downsample = ceil(sqrt(N_latent / N_block)); the block is merged when
    downsample <= max_downsample, and its grid is the latent size divided
    (ceil) by the downsample factor.
    """
    lh, lw = latent_hw
    downsample = int(math.ceil(math.sqrt(lh * lw / num_tokens)))
    if downsample > max_downsample:
        return None
    return int(math.ceil(lh / downsample)), int(math.ceil(lw / downsample))


@lru_cache(maxsize=64)
def _fixed_partition(h: int, w: int, sy: int, sx: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """src and dst token indices with dst at the top-left of each full cell (ascending order)."""
    is_dst = torch.zeros(h, w, dtype=torch.bool, device=device)
    is_dst[: (h // sy) * sy : sy, : (w // sx) * sx : sx] = True
    flat = is_dst.flatten()
    ids = torch.arange(h * w, device=device)
    return ids[~flat], ids[flat]


def partition(
    grid: tuple[int, int],
    stride: tuple[int, int] = (2, 2),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices (src, dst) of a grid, both in ascending token order.

    One dst per full sy x sx cell: the top-left token, or a random token per
    cell drawn from ``generator`` (as tomesd does; one draw shared by the batch).
    Tokens in a ragged border that no full cell covers are src.
    """
    h, w = grid
    sy, sx = stride
    device = torch.device(device)
    if generator is None:
        return _fixed_partition(h, w, sy, sx, str(device))
    hsy, wsx = h // sy, w // sx
    offsets = torch.randint(sy * sx, (hsy, wsx), generator=generator, device=generator.device).to(device)
    oy, ox = offsets // sx, offsets % sx
    rows = torch.arange(hsy, device=device).unsqueeze(1) * sy + oy
    cols = torch.arange(wsx, device=device).unsqueeze(0) * sx + ox
    is_dst = torch.zeros(h * w, dtype=torch.bool, device=device)
    is_dst[(rows * w + cols).flatten()] = True
    ids = torch.arange(h * w, device=device)
    return ids[~is_dst], ids[is_dst]


def _check_args(metric: torch.Tensor, grid: tuple[int, int], stride: tuple[int, int]) -> None:
    if metric.ndim != 3:
        raise CatomeError(f"metric must be [B, N, C], got shape {tuple(metric.shape)}")
    h, w = grid
    if h <= 0 or w <= 0 or metric.shape[1] != h * w:
        raise CatomeError(f"grid {h}x{w} does not cover the metric's {metric.shape[1]} tokens")
    if len(stride) != 2 or min(stride) < 1:
        raise CatomeError(f"stride must be two positive ints, got {stride}")
    if metric.shape[0] < 1:
        raise CatomeError("metric has an empty batch")


def check_r_multiple(multiple: object) -> int:
    """``multiple`` as an int >= 1, else a CatomeError saying what to give."""
    return check_int("r_multiple", multiple, 1, hint="1: r as counted, off")


def round_merged(r: int, multiple: int = 1) -> int:
    """``r`` rounded down to a multiple of ``multiple``: ``multiple * (r // multiple)`` (``multiple`` 1: ``r``).

    The one place r is rounded (bounded shape variety): :func:`count_merged`
    applies it to the counted r, so the engine's controller and the eager
    patch, which both match through :func:`match_tokens`, round alike.
    """
    q = check_r_multiple(multiple)
    return r if q == 1 else q * (r // q)


def count_merged(
    node_max: torch.Tensor,
    num_tokens: int,
    *,
    threshold: float | None = None,
    ratio: float | None = None,
    num_merged: int | None = None,
    multiple: int = 1,
) -> int:
    """r for a batch: exactly one of threshold, ratio or an explicit count, rounded down to a multiple of ``multiple``.

    threshold: r = max over the batch of #(node_max >= t); t >= 1 merges nothing.
    ratio: r = min(int(N * ratio), #src). num_merged: min(num_merged, #src).
    ``multiple`` q (default 1, off): r becomes q * floor(r / q), so a site
    takes at most #src / q + 1 distinct values of r.
    """
    given = [v is not None for v in (threshold, ratio, num_merged)]
    if sum(given) != 1:
        raise CatomeError("give exactly one of threshold (CA-ToMe) or ratio (ToMe)")
    return round_merged(_count(node_max, num_tokens, threshold, ratio, num_merged), multiple)


def _count(node_max: torch.Tensor, num_tokens: int, threshold: float | None, ratio: float | None,
           num_merged: int | None) -> int:
    num_src = int(node_max.shape[-1])
    if threshold is not None:
        t = float(threshold)
        if not math.isfinite(t) or not -1.0 <= t <= 1.0:
            raise CatomeError(f"threshold must be a number in [-1, 1], got {threshold}")
        if t >= 1.0 or num_src == 0:
            return 0
        return int((node_max >= t).sum(dim=-1).max().item())
    if ratio is not None:
        q = float(ratio)
        if not math.isfinite(q) or not 0.0 <= q < 1.0:
            raise CatomeError(f"ratio must be in [0, 1), got {ratio}")
        return min(int(num_tokens * q), num_src)
    if num_merged is None:  # unreachable: exactly one of the three is given (checked above)
        raise CatomeError("give exactly one of threshold (CA-ToMe) or ratio (ToMe)")
    if int(num_merged) < 0:
        raise CatomeError(f"num_merged must be >= 0, got {num_merged}")
    return min(int(num_merged), num_src)


def match_tokens(
    metric: torch.Tensor,
    grid: tuple[int, int],
    *,
    threshold: float | None = None,
    ratio: float | None = None,
    num_merged: int | None = None,
    stride: tuple[int, int] = (2, 2),
    generator: torch.Generator | None = None,
    multiple: int = 1,
) -> MergePlan:
    """Match the tokens of ``metric`` [B, N, C] on an (h, w) grid and return the plan.

    Exactly one of ``threshold`` (CA-ToMe adaptive: r = max over the batch of
    the number of src whose best cosine similarity is >= t) and ``ratio``
    (ToMe: r = min(int(N * ratio), #src)); ``num_merged`` forces r directly
    (benchmarks). ``generator`` picks a random dst per cell (tomesd's
    behaviour); without it dst is the top-left token of each cell (the paper).
    ``multiple`` q rounds r down to a multiple of q (see :func:`count_merged`):
    the q * floor(r / q) best-scoring src are merged.
    """
    _check_args(metric, grid, stride)
    check_r_multiple(multiple)
    b, n, _ = metric.shape
    device = metric.device
    src_ids, dst_ids = partition(grid, stride, generator, device)
    num_src, num_dst = src_ids.numel(), dst_ids.numel()
    if num_dst == 0 or num_src == 0:
        count_merged(metric.new_zeros(b, 0), n, threshold=threshold, ratio=ratio, num_merged=num_merged,
                     multiple=multiple)
        return MergePlan.identity(b, n, device)

    # no_grad, not inference_mode: plan tensors must stay usable as gather indices under autograd.
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        scores = m.index_select(1, src_ids) @ m.index_select(1, dst_ids).transpose(-1, -2)  # [B, Ns, Nd]
        node_max, node_idx = scores.max(dim=-1)
        r = count_merged(node_max, n, threshold=threshold, ratio=ratio, num_merged=num_merged, multiple=multiple)
        if r == 0:
            return MergePlan.identity(b, n, device)
        edge_idx = node_max.float().argsort(dim=-1, descending=True, stable=True)  # [B, Ns]
        merged_edges, unm_edges = edge_idx[:, :r], edge_idx[:, r:]
        kept = n - r
        num_unm = num_src - r

        keep_idx = torch.cat([src_ids[unm_edges], dst_ids.expand(b, -1)], dim=1)
        src_idx = src_ids[merged_edges]
        dst_of_merged = node_idx.gather(1, merged_edges)
        slot_idx = dst_of_merged + num_unm

        counts = torch.zeros(b, num_dst, dtype=torch.float32, device=device)
        counts.scatter_add_(1, dst_of_merged, torch.ones(b, r, dtype=torch.float32, device=device))
        weight = torch.cat(
            [torch.ones(b, num_unm, dtype=torch.float32, device=device), 1.0 / (1.0 + counts)], dim=1
        )

        unmerge_idx = torch.empty(b, n, dtype=torch.int64, device=device)
        unmerge_idx.scatter_(1, keep_idx, torch.arange(kept, device=device).expand(b, -1))
        unmerge_idx.scatter_(1, src_idx, slot_idx)

    return MergePlan(
        keep_idx=keep_idx.contiguous(),
        src_idx=src_idx.contiguous(),
        slot_idx=slot_idx.contiguous(),
        weight=weight.contiguous(),
        unmerge_idx=unmerge_idx,
        num_merged=r,
    )


def forced_plan(batch_size: int, grid: tuple[int, int], fraction: float, *, stride: tuple[int, int] = (2, 2),
                device: torch.device | str = "cpu", seed: int = 0) -> MergePlan:
    """A plan that merges ``fraction`` of the src tokens, independent of any weights.

    Used for speed measurements: the matching runs on a seeded random metric
    with r forced to round(fraction * #src), so the graphs see exactly the
    shapes and index patterns of a real merge.
    """
    if not 0.0 <= fraction <= 1.0:
        raise CatomeError(f"merge fraction must be in [0, 1], got {fraction}")
    h, w = grid
    src_ids, _ = partition(grid, stride, None, device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    metric = torch.randn(batch_size, h * w, 8, generator=gen).to(device)
    return match_tokens(metric, grid, num_merged=int(round(fraction * src_ids.numel())), stride=stride)
