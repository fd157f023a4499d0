"""Plan agreement: compare two merge plans in token space and explain their differences as near-ties.

Two sides (an engine and the eager reference, say) match the same site at the
same step on block inputs ``x_a`` and ``x_b`` that differ by float rounding
only. Each side's plan is the exact outcome of matching on its *own* input,
so where a src token's best dst (or its place in the sort) is a near-tie,
the two plans may legitimately differ. This module says whether every
difference is provably such a near-tie.

The bound
---------
Write u = x / |x| for the exact unit vectors and s(i, j) = <u_i, u_j> for the
exact cosine score. For unit vectors

    |<u, v> - <u', v'>| = |<u - u', v> + <u', v - v'>| <= |u - u'| + |v - v'|,

so the exact scores of the two sides differ by at most
``d_i + d_j`` with ``d_i = |u_a_i - u_b_i|`` (measured, in float64).

Each side computes its scores in floating point with unit roundoff ``u``
(2^-24 for fp32, 2^-11 for fp16; TF32 / bf16 matmuls count as theirs).
Matching normalises ``m = x / fl(|x|)`` and takes ``fl(m_i . m_j)`` over C
channels, in any summation order. With ``g = C u / (1 - C u)``:

- ``fl(|x|) = |x| (1 + th)`` with ``|th| <= g / 2 (1 + g) + u`` (the sum of C
  squares, then a square root);
- ``|m - u| <= eta = (th + u) / (1 - th)`` (one more rounding per component),
  so ``|m| <= 1 + eta``;
- ``|fl(m_i . m_j) - m_i . m_j| <= g |m_i| |m_j| <= g (1 + eta)^2`` and
  ``|m_i . m_j - u_i . u_j| <= eta (2 + eta)``.

So each computed score is within ``delta = g (1 + eta)^2 + eta (2 + eta)``
(about ``(2C + 4) u``: 3.9e-5 at C = 320 in fp32) of the exact one
(:func:`score_rounding_bound`). The reference scores here are evaluated in
float64 from ``x_b``, which adds the same bound with u = 2^-53 per term.

What counts as explained
------------------------
Let ``s`` be the exact (float64) scores on side b, ``nm(i) = max_j s(i, j)``
and ``E_i = d_i + max_dst d_j + delta`` the most a computed node_max of src
i can differ from ``nm(i)`` on either side.

- A src merged on both sides, into dst A on side a and C on side b: side a
  computed ``s_a(A) >= s_a(C)``, so ``s(C) - s(A) <= 2 d_i + d_A + d_C +
  2 delta``; side b computed ``s_b(C) >= s_b(A)``, so ``s(A) - s(C) <= 2
  delta``. Explained when ``|s(A) - s(C)|`` is within ``2 d_i + d_A + d_C +
  2 delta``.
- A src merged on side X only (it sits at the threshold or at the r-th place
  of the sort): explained when it could rank within X's first r_X (fewer than
  r_X src are certainly above it: ``nm(j) - E_j > nm(i) + E_i``) and outside
  the other side's first r_Y (at least r_Y other src could rank at or above
  it: ``nm(j) + E_j >= nm(i) - E_i``).
- Differing r (threshold mode, r = max over the batch of #(node_max >= t)):
  explained when both lie in ``[max_b #(nm - E >= t), max_b #(nm + E >= t)]``.
  With a fixed count (ratio, merge fraction) r does not depend on the scores
  and must be equal. Where r is rounded down to a multiple of q
  (``MergeSettings.r_multiple``), both sides' r must be multiples of q and lie
  in that interval with both ends rounded down alike (the rounding is
  monotone, so a count anywhere in the interval rounds into it); the merged
  sets are then the first r of the sort, so a token merged on one side only
  is judged at the r-th place, as above.
- A merged token that is not a src of the partition, or a dst that is not a
  dst of it, is never explained.

Plans are compared in token space (which dst each src joins, which src are
merged); the order of edges and slots does not matter after unmerge. Only the
first ``num_merged`` entries of ``src_idx`` / ``slot_idx`` are read, so an
r = 0 plan may carry a placeholder self-merge.
"""

from __future__ import annotations

import logging
import math
from typing import Any
from dataclasses import dataclass

import torch

from catome_export.merging.matching import check_r_multiple, round_merged
from catome_export.merging.plan import MergePlan

logger = logging.getLogger(__name__)

_ROW_CHUNK = 2048
"""src rows per float64 score block (bounds memory at large N)."""

KIND_DST = "dst"
"""Merged on both sides, into different dst tokens."""
KIND_A_ONLY = "merged_a_only"
"""Merged on side a only."""
KIND_B_ONLY = "merged_b_only"
"""Merged on side b only."""
KIND_R = "r"
"""Different merged counts (no token)."""
KIND_NOT_SRC = "not_src"
"""A side merged a token that is not a src of the partition."""
KIND_NOT_DST = "not_dst"
"""A side merged a src into a token that is not a dst of the partition."""


def unit_roundoff(dtype: torch.dtype, device_type: str = "cpu") -> float:
    """The unit roundoff of a cosine-score computation in ``dtype`` on ``device_type``.

    fp32 matmuls count as TF32 (2^-11) where torch allows TF32 on CUDA and as
    bf16 (2^-8) where its matmul precision is ``medium``.
    """
    if dtype == torch.float64:
        return 2.0 ** -53
    if dtype == torch.float16:
        return 2.0 ** -11
    if dtype == torch.bfloat16:
        return 2.0 ** -8
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return 2.0 ** -8
    if device_type == "cuda" and (precision == "high" or torch.backends.cuda.matmul.allow_tf32):
        return 2.0 ** -11
    return 2.0 ** -24


def score_rounding_bound(channels: int, roundoff: float) -> float:
    """Most a computed cosine score over ``channels`` can differ from the exact one (see the module docstring).

    ``inf`` where ``channels * roundoff >= 1/2`` (no useful guarantee).
    """
    cu = channels * roundoff
    if channels < 1 or not 0 <= cu < 0.5:
        return math.inf
    g = cu / (1.0 - cu)
    th = g / 2.0 * (1.0 + g) + roundoff
    eta = (th + roundoff) / (1.0 - th)
    return g * (1.0 + eta) ** 2 + eta * (2.0 + eta)


@dataclass(frozen=True)
class TokenDifference:
    """One way the two plans differ, and whether a near-tie explains it."""

    kind: str
    """One of the ``KIND_*`` names."""
    batch: int
    """Batch item."""
    token: int
    """Token index in the site's sequence (-1 for an r difference)."""
    dst_a: int
    """The token's dst on side a (-1: not merged); for ``r``, side a's r."""
    dst_b: int
    """The token's dst on side b (-1: not merged); for ``r``, side b's r."""
    gap: float
    """How far apart the two choices are in exact scores (see ``detail``)."""
    bound: float
    """The most rounding and the input difference can account for."""
    explained: bool
    detail: str
    """A one-line account in words."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "batch": self.batch, "token": self.token, "dst_a": self.dst_a,
                "dst_b": self.dst_b, "gap": self.gap, "bound": self.bound, "explained": self.explained,
                "detail": self.detail}


@dataclass(frozen=True)
class PlanComparison:
    """Two plans of one site and step, compared in token space."""

    merged_a: int
    merged_b: int
    differences: tuple[TokenDifference, ...]
    max_input_diff: float
    """max_i |u_a_i - u_b_i| (unit vectors of the two inputs)."""
    rounding: float
    """delta: the per-score rounding bound used."""

    @property
    def same(self) -> bool:
        """True when the plans are the same in token space."""
        return not self.differences

    @property
    def flips(self) -> tuple[TokenDifference, ...]:
        """Token differences explained as near-ties (r differences not counted)."""
        return tuple(d for d in self.differences if d.explained and d.kind != KIND_R)

    @property
    def unexplained(self) -> tuple[TokenDifference, ...]:
        return tuple(d for d in self.differences if not d.explained)

    @property
    def r_explained(self) -> bool:
        """r equal, or different within what near-ties at the threshold allow."""
        return all(d.explained for d in self.differences if d.kind == KIND_R)

    @property
    def tokens_explained(self) -> bool:
        return all(d.explained for d in self.differences if d.kind != KIND_R)


def token_destinations(plan: MergePlan) -> torch.Tensor:
    """[B, N] int64: for each token the token whose slot it was merged into, -1 where it keeps its own slot."""
    b, n, r = plan.batch_size, plan.num_tokens, plan.num_merged
    dst = torch.full((b, n), -1, dtype=torch.int64, device=plan.unmerge_idx.device)
    if r == 0:
        return dst
    src = plan.src_idx[:, :r]
    owner = plan.keep_idx.gather(1, plan.slot_idx[:, :r])
    return dst.scatter(1, src, owner)


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().to(torch.float64)
    unit: torch.Tensor = x / x.norm(dim=-1, keepdim=True)
    return unit


def _node_max(u: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> torch.Tensor:
    """[B, Ns] float64: best exact score of every src."""
    dst = u.index_select(1, dst_ids).transpose(-1, -2)
    parts = [(u.index_select(1, src_ids[k:k + _ROW_CHUNK]) @ dst).amax(dim=-1)
             for k in range(0, src_ids.numel(), _ROW_CHUNK)]
    return torch.cat(parts, dim=1)


def compare_plans(x_a: torch.Tensor, plan_a: MergePlan, x_b: torch.Tensor, plan_b: MergePlan,
                  src_ids: torch.Tensor, dst_ids: torch.Tensor, *, threshold: float | None,
                  roundoff: float, names: tuple[str, str] = ("side a", "side b"),
                  multiple: int = 1) -> PlanComparison:
    """Compare the plans two sides matched on ``x_a`` / ``x_b`` [B, N, C] and explain each difference.

    ``src_ids`` / ``dst_ids``: the partition both sides matched on.
    ``threshold``: CA-ToMe's t (r from a count of scores), or None where r is
    a fixed count. ``roundoff``: the larger unit roundoff of the two sides'
    score computations (:func:`unit_roundoff`). ``multiple``: the q both
    sides rounded r down to (``MergeSettings.r_multiple``; 1: none). Pure tensor logic; reads a
    few scalars back to the host, and the full float64 score rows only where
    the merged sets or r differ.
    """
    if x_a.shape != x_b.shape or x_a.ndim != 3:
        raise ValueError(f"inputs must both be [B, N, C], got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    check_r_multiple(multiple)
    bsz, n, c = x_a.shape
    device = x_b.device
    x_a = x_a.to(device)
    src_ids, dst_ids = src_ids.to(device), dst_ids.to(device)
    r_a, r_b = plan_a.num_merged, plan_b.num_merged
    dest_a, dest_b = token_destinations(plan_a).to(device), token_destinations(plan_b).to(device)
    delta = score_rounding_bound(c, roundoff) + 4.0 * score_rounding_bound(c, 2.0 ** -53)
    u_a, u_b = _unit(x_a), _unit(x_b)
    d = (u_a - u_b).norm(dim=-1)  # [B, N]
    max_d = float(d.max()) if d.numel() else 0.0
    same_r = r_a == r_b
    if same_r and bool((dest_a == dest_b).all()):
        return PlanComparison(r_a, r_b, (), max_d, delta)

    is_src = torch.zeros(n, dtype=torch.bool, device=device)
    is_src[src_ids] = True
    is_dst = torch.zeros(n, dtype=torch.bool, device=device)
    is_dst[dst_ids] = True
    pos = torch.full((n,), -1, dtype=torch.int64, device=device)
    pos[src_ids] = torch.arange(src_ids.numel(), device=device)
    nm = _node_max(u_b, src_ids, dst_ids) if src_ids.numel() and dst_ids.numel() else None  # [B, Ns]
    d_src = d.index_select(1, src_ids)
    d_dst_max = d.index_select(1, dst_ids).amax(dim=-1, keepdim=True) if dst_ids.numel() else 0.0
    err = d_src + d_dst_max + delta  # [B, Ns]: bound on a computed node_max vs nm

    found: list[TokenDifference] = []
    if not same_r:
        found.append(_explain_r(nm, err, r_a, r_b, threshold, names, multiple))
    differ = (dest_a != dest_b).nonzero().tolist()
    for b, tok in differ:
        a_dst, b_dst = int(dest_a[b, tok]), int(dest_b[b, tok])
        if not bool(is_src[tok]):
            found.append(TokenDifference(KIND_NOT_SRC, b, tok, a_dst, b_dst, math.nan, math.nan, False,
                                         f"token {tok} is merged but is not a src token of the partition"))
            continue
        bad_dst = [t for t in (a_dst, b_dst) if t >= 0 and not bool(is_dst[t])]
        if bad_dst:
            found.append(TokenDifference(KIND_NOT_DST, b, tok, a_dst, b_dst, math.nan, math.nan, False,
                                         f"src {tok} is merged into token {bad_dst[0]}, which is not a dst token"))
            continue
        if a_dst >= 0 and b_dst >= 0:
            found.append(_explain_dst(u_b, d, b, tok, a_dst, b_dst, delta, names))
        else:
            # with r rounded, the merged set ends at the r-th place of the sort, not at the threshold
            found.append(_explain_membership(nm, err, b, tok, int(pos[tok]), a_dst, b_dst, r_a, r_b,
                                             threshold if multiple == 1 else None, names))
    result = PlanComparison(r_a, r_b, tuple(found), max_d, delta)
    if result.unexplained:
        logger.debug("plans differ beyond near-ties: %s", result.unexplained[0].detail)
    return result


def _explain_dst(u_b: torch.Tensor, d: torch.Tensor, b: int, tok: int, a_dst: int, b_dst: int,
                 delta: float, names: tuple[str, str]) -> TokenDifference:
    s_a = float(u_b[b, tok] @ u_b[b, a_dst])
    s_b = float(u_b[b, tok] @ u_b[b, b_dst])
    gap = s_b - s_a
    bound = 2.0 * float(d[b, tok]) + float(d[b, a_dst]) + float(d[b, b_dst]) + 2.0 * delta
    ok = abs(gap) <= bound
    word = "a near-tie" if ok else "not a near-tie"
    return TokenDifference(KIND_DST, b, tok, a_dst, b_dst, gap, bound, ok,
                           f"src {tok} goes to dst {a_dst} on {names[0]} and {b_dst} on {names[1]}: exact scores "
                           f"{s_a:.9f} vs {s_b:.9f} differ by {abs(gap):.3g}, possible error {bound:.3g} ({word})")


def _explain_membership(nm: torch.Tensor | None, err: torch.Tensor, b: int, tok: int, p: int, a_dst: int,
                        b_dst: int, r_a: int, r_b: int, threshold: float | None,
                        names: tuple[str, str]) -> TokenDifference:
    merged_on_a = a_dst >= 0
    kind = KIND_A_ONLY if merged_on_a else KIND_B_ONLY
    r_x, r_y = (r_a, r_b) if merged_on_a else (r_b, r_a)
    if nm is None or p < 0:
        return TokenDifference(kind, b, tok, a_dst, b_dst, math.nan, math.nan, False,
                               f"src {tok} is merged on one side only and has no scores")
    vals, e = nm[b], err[b]
    mine, e_i = float(vals[p]), float(e[p])
    others = torch.ones_like(vals, dtype=torch.bool)
    others[p] = False
    certainly_above = int(((vals - e > mine + e_i) & others).sum())
    possibly_above = int(((vals + e >= mine - e_i) & others).sum())
    ok = certainly_above < r_x and possibly_above >= r_y
    order = vals.argsort(descending=True, stable=True)
    r_th = float(vals[order[max(r_x, r_y) - 1]]) if max(r_x, r_y) >= 1 else math.nan
    gap = mine - (threshold if threshold is not None else r_th)
    side = names[0] if merged_on_a else names[1]
    where = f"threshold {threshold:g}" if threshold is not None else f"r-th score {r_th:.9f}"
    return TokenDifference(kind, b, tok, a_dst, b_dst, gap, 2.0 * e_i, ok,
                           f"src {tok} is merged on {side} only: best exact score {mine:.9f} ({where}, r-th score "
                           f"{r_th:.9f}), possible error {e_i:.3g}; {certainly_above} src certainly above it "
                           f"(r = {r_x} there), {possibly_above} possibly at or above it (r = {r_y} on the other "
                           f"side) ({'a near-tie' if ok else 'not a near-tie'})")


def _explain_r(nm: torch.Tensor | None, err: torch.Tensor, r_a: int, r_b: int, threshold: float | None,
               names: tuple[str, str], multiple: int = 1) -> TokenDifference:
    if threshold is None or nm is None:
        return TokenDifference(KIND_R, -1, -1, r_a, r_b, float(r_a - r_b), 0.0, False,
                               f"r is {r_a} on {names[0]} and {r_b} on {names[1]}, and with a fixed count "
                               "it cannot differ")
    lo = round_merged(int((nm - err >= threshold).sum(dim=-1).max()), multiple)
    hi = round_merged(int((nm + err >= threshold).sum(dim=-1).max()), multiple)
    aligned = r_a % multiple == 0 and r_b % multiple == 0
    ok = aligned and lo <= r_a <= hi and lo <= r_b <= hi
    rounded = "" if multiple == 1 else f" (counts rounded down to multiples of {multiple})"
    misaligned = "" if aligned else f"; r must be a multiple of {multiple} on both sides"
    return TokenDifference(KIND_R, -1, -1, r_a, r_b, float(r_a - r_b), float(hi - lo), ok,
                           f"r is {r_a} on {names[0]} and {r_b} on {names[1]}; scores within their possible error of "
                           f"t = {threshold:g} allow r in [{lo}, {hi}]{rounded}{misaligned} "
                           f"({'a near-tie' if ok else 'not a near-tie'})")
