"""Checkpoint schedules that minimise pair drift: exact search by dynamic programming.

Model: a site that caches its pairs at checkpoint c uses them at every step
up to the next checkpoint. The *drift* at step s is the Jaccard distance
between the pairs the site would match at s and the cached pairs of c(s), the
last checkpoint <= s; a schedule's drift is the sum over steps (and sites).
``cost[c, s]`` (c <= s) is that per-step drift, summed over sites.

With k checkpoints (loop index 0 always one of them: the first step has no
cache and computes anyway), the steps split into k segments [c_j, c_{j+1}),
and the total drift is a sum of segment costs. The optimum is found exactly
by dynamic programming over (checkpoints used, end of the covered prefix) in
O(k * T^2) from a T x (T + 1) table of segment costs.

Everything here works in 0-based *loop indices*; :func:`to_step_numbers`
turns them into the step numbers of a schedule with a given ``step_base``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from catome_export.checks import check_int
from catome_export.errors import CatomeError
from catome_export.merging.schedules import Schedule


@dataclass(frozen=True)
class SearchResult:
    """The best schedule with ``k`` checkpoints for a cost matrix."""

    loop_indices: tuple[int, ...]
    """Checkpoints as 0-based loop indices, ascending, starting with 0."""
    drift: float
    """Total drift of the schedule (sum over steps of cost[c(s), s])."""


def _check_cost(cost: np.ndarray) -> np.ndarray:
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 1:
        raise CatomeError(f"the drift cost matrix must be square [T, T] with T >= 1, got shape {c.shape}")
    if not np.isfinite(np.triu(c)).all():
        raise CatomeError("the drift cost matrix holds non-finite values: the pair tracking run went wrong")
    return c


def segment_costs(cost: np.ndarray) -> np.ndarray:
    """seg[c, e] = sum of cost[c, s] for s in [c, e): the drift of a segment cached at c, ending before e.

    Shape [T, T + 1]; entries with e <= c are +inf (no such segment).
    """
    c = _check_cost(cost)
    t = c.shape[0]
    seg = np.full((t, t + 1), np.inf)
    for start in range(t):
        seg[start, start + 1:] = np.cumsum(c[start, start:])
    return seg


def optimal_checkpoints(cost: np.ndarray, k: int) -> SearchResult:
    """The k checkpoints (loop index 0 among them) with the least total drift: exact DP optimum.

    Ties go to the schedule whose checkpoints come earliest.
    """
    c = _check_cost(cost)
    t = c.shape[0]
    k = check_int("the checkpoint budget", int(k) if isinstance(k, np.integer) else k, 1, t,
                  hint="the number of steps")
    seg = segment_costs(c)
    # best[j, e]: least drift covering steps [0, e) with j checkpoints; arg[j, e]: start of the last segment.
    best = np.full((k + 1, t + 1), np.inf)
    arg = np.zeros((k + 1, t + 1), dtype=np.int64)
    best[1, 1:] = seg[0, 1:]
    for j in range(2, k + 1):
        for e in range(j, t + 1):
            starts = np.arange(j - 1, e)
            total = best[j - 1, starts] + seg[starts, e]
            i = int(np.argmin(total))
            best[j, e] = total[i]
            arg[j, e] = starts[i]
    picks = []
    e = t
    for j in range(k, 1, -1):
        start = int(arg[j, e])
        picks.append(start)
        e = start
    return SearchResult(tuple([0, *reversed(picks)]), float(best[k, t]))


def schedule_drift(cost: np.ndarray, loop_indices: Iterable[int]) -> float:
    """Total drift of a schedule given as loop indices (loop index 0 is always a checkpoint)."""
    c = _check_cost(cost)
    t = c.shape[0]
    points = sorted({0, *(int(i) for i in loop_indices if 0 <= int(i) < t)})
    ends = [*points[1:], t]
    return float(sum(c[start, start:end].sum() for start, end in zip(points, ends)))


def schedule_loop_indices(schedule: Schedule, num_calls: int) -> tuple[int, ...]:
    """Loop indices at which ``schedule`` recomputes in a run of ``num_calls`` U-Net calls.

    Follows :meth:`Schedule.is_checkpoint`, plus loop index 0 (the empty cache
    always computes), so entry 0 with ``step_base`` 1 adds nothing and entries
    beyond the run are dropped.
    """
    return tuple(i for i in range(num_calls) if i == 0 or schedule.is_checkpoint(i))


def to_step_numbers(loop_indices: Iterable[int], step_base: int) -> tuple[int, ...]:
    """Loop indices -> step numbers of a schedule with ``step_base`` (0 or 1)."""
    if step_base not in (0, 1):
        raise CatomeError(f"step_base must be 0 or 1, got {step_base!r}")
    return tuple(int(i) + step_base for i in sorted(loop_indices))
