"""Pair sets of a merge and the Jaccard distance between them (paper section III-B).

The pair set of a merge site at one step is the set of (src token -> dst
token) merges its matching made, per batch item. Because every src token
merges into at most one dst, a pair set is stored as a *pair map*: an int
tensor [B, N] holding, for each token, the token id of the dst it merges into,
or -1 when the token is not a merged src. Two pair maps agree on a pair
exactly where they hold the same non-negative value, which makes the Jaccard
distance a few vectorised comparisons.

Jaccard distance: ``1 - |A ∩ B| / |A ∪ B|``, defined as 0 when both sets are
empty (nothing merged at either step means nothing changed). For a batch, the
distance is the mean of the per-item distances (each item is matched on its
own tokens; only r is shared across the batch).
"""

from __future__ import annotations

from collections.abc import Set
from typing import Hashable

import numpy as np
import torch

from catome_export.errors import CatomeError
from catome_export.merging.plan import MergePlan

NOT_MERGED = -1
"""Pair-map value of a token that is not a merged src."""


def jaccard_distance(a: Set[Hashable], b: Set[Hashable]) -> float:
    """``1 - |a ∩ b| / |a ∪ b|`` for two sets; 0 when both are empty."""
    union = len(a | b)
    if union == 0:
        return 0.0
    return 1.0 - len(a & b) / union


def pair_map(plan: MergePlan) -> torch.Tensor:
    """The plan's pairs as a map [B, N] int64: dst token id of each merged src, else -1.

    The dst token of merged src ``src_idx[b, j]`` is the token in the merged
    sequence slot it adds into: ``keep_idx[b, slot_idx[b, j]]``.
    """
    b, n = plan.batch_size, plan.num_tokens
    out = torch.full((b, n), NOT_MERGED, dtype=torch.int64, device=plan.unmerge_idx.device)
    if plan.num_merged == 0:
        return out
    dst = plan.keep_idx.gather(1, plan.slot_idx)
    out.scatter_(1, plan.src_idx, dst)
    return out


def pair_sets(plan_or_map: MergePlan | torch.Tensor) -> list[frozenset[tuple[int, int]]]:
    """The pair set ``{(src token, dst token)}`` of every batch item (for inspection and tests)."""
    pm = pair_map(plan_or_map) if isinstance(plan_or_map, MergePlan) else plan_or_map
    out = []
    for row in pm.detach().cpu().tolist():
        out.append(frozenset((src, dst) for src, dst in enumerate(row) if dst != NOT_MERGED))
    return out


def _check_maps(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 2:
        raise CatomeError(f"pair maps must both be [B, N] of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def map_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jaccard distance between two pair maps [B, N], averaged over the batch items."""
    _check_maps(a, b)
    return float(_batched_distance(a.unsqueeze(0), b).mean())


def _batched_distance(maps: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """Per-item distance of every map in ``maps`` [T, B, N] to ``ref`` ([B, N], or [T, B, N] elementwise): [T, B]."""
    ref = ref.to(maps.device)
    in_ref = ref >= 0
    in_maps = maps >= 0
    inter = ((maps == ref) & in_ref).sum(-1)
    union = in_maps.sum(-1) + in_ref.sum(-1) - inter
    inter_np = inter.cpu().numpy().astype(np.float64)
    union_np = union.cpu().numpy().astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        dist = np.where(union_np == 0, 0.0, 1.0 - inter_np / np.maximum(union_np, 1.0))
    return dist


def distance_matrix(maps: torch.Tensor) -> np.ndarray:
    """D[c, s] = distance between the pairs of step c and step s, for maps [T, B, N] (mean over B).

    Symmetric with a zero diagonal. D[c, s] for c <= s is the drift at step s
    of a site that cached its pairs at checkpoint c.
    """
    if maps.ndim != 3:
        raise CatomeError(f"pair maps must be [T, B, N], got shape {tuple(maps.shape)}")
    t = maps.shape[0]
    out = np.zeros((t, t), dtype=np.float64)
    for c in range(t):
        out[c] = _batched_distance(maps, maps[c]).mean(axis=-1)
    return out


def consecutive_distances(maps: torch.Tensor) -> np.ndarray:
    """Distance between each step's pairs and the previous step's: [T] with NaN at step 0."""
    if maps.ndim != 3:
        raise CatomeError(f"pair maps must be [T, B, N], got shape {tuple(maps.shape)}")
    out = np.full(maps.shape[0], np.nan)
    if maps.shape[0] > 1:
        out[1:] = _batched_distance(maps[1:], maps[:-1]).mean(axis=-1)
    return out
