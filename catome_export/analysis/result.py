"""The pair analysis of a model: per-step pair drift, schedule proposals and their scores.

:func:`analyze_pairs` runs one tracking loop per pair of text embeddings (one
generation each, see :mod:`catome_export.analysis.tracking`) and keeps the
mean over runs of each site's T x T distance matrix. Everything else (the
per-step table, the drift of any schedule, the optimal proposal) is read from
that matrix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from catome_export.checks import check_int
from catome_export.analysis.inputs import random_text_embeddings
from catome_export.analysis.schedule_search import (
    optimal_checkpoints,
    schedule_drift,
    schedule_loop_indices,
    to_step_numbers,
)
from catome_export.analysis.tracking import PairTrace, TrackingConfig, merged_fraction, track_pairs
from catome_export.errors import CatomeError
from catome_export.progress import Progress
from catome_export.merging.schedules import NAMED_SCHEDULES, Schedule, parse_schedule
from catome_export.models.sites import MergeSite

logger = logging.getLogger(__name__)

PAPER_SCHEDULES = ("config1", "config2", "config3", "config4")
"""The paper's Table II lists, compared against every proposal."""

DEFAULT_BUDGET = len(NAMED_SCHEDULES["config3"])
"""Default checkpoint budget: the size of CONFIG_3, the paper's best list (13)."""


@dataclass(frozen=True)
class ScheduleScore:
    """A schedule and its drift on an analysed run."""

    name: str
    checkpoints: tuple[int, ...] | None
    """Step numbers as listed (None = every step)."""
    step_base: int
    loop_indices: tuple[int, ...]
    """Loop indices where matching really runs in this run (0 always; entries beyond the run dropped)."""
    drift: float
    """Sum over steps and sites of the Jaccard distance between true and cached pairs."""
    mean_drift: float
    """``drift`` per step and site."""
    best_drift: float | None = None
    """The least drift any schedule with as many checkpoints reaches on this run (None: not computed)."""

    @property
    def num_checkpoints(self) -> int:
        return len(self.loop_indices)

    def schedule(self) -> Schedule:
        return Schedule(self.name, self.checkpoints, self.step_base)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "checkpoints": list(self.checkpoints) if self.checkpoints is not None else None,
            "step_base": self.step_base,
            "loop_indices": list(self.loop_indices),
            "num_checkpoints": self.num_checkpoints,
            "drift": self.drift,
            "mean_drift": self.mean_drift,
            "best_drift": self.best_drift,
        }


@dataclass(frozen=True)
class PairAnalysis:
    """Pair drift of every site over one or more tracked generations."""

    config: TrackingConfig
    sites: tuple[MergeSite, ...]
    grids: tuple[tuple[int, int], ...]
    timesteps: tuple[int, ...]
    distance: np.ndarray
    """[S, T, T]: Jaccard distance between the pairs of calls c and s, per site (mean over runs and batch)."""
    consecutive: np.ndarray
    """[T, S]: distance to the previous call's pairs (NaN at call 0), mean over runs."""
    merged: np.ndarray
    """[R, T, S]: r of each site at each call, per run."""
    merged_fraction: float
    """Fraction of tokens merged over all sites, calls, batch items and runs."""
    inputs: str
    """What the U-Net was conditioned on (random embeddings, or the prompts)."""

    @property
    def num_calls(self) -> int:
        return len(self.timesteps)

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    def cost_matrix(self) -> np.ndarray:
        """[T, T]: drift at call s when the pairs were cached at call c, summed over sites."""
        return self.distance.sum(axis=0)

    def _score(self, name: str, checkpoints: tuple[int, ...] | None, step_base: int,
               loops: tuple[int, ...]) -> ScheduleScore:
        drift = schedule_drift(self.cost_matrix(), loops)
        return ScheduleScore(name, checkpoints, step_base, loops, drift,
                             drift / max(1, self.num_calls * self.num_sites))

    def evaluate(self, schedule: Schedule) -> ScheduleScore:
        """Drift of a schedule as it would run (its :meth:`Schedule.is_checkpoint`, plus loop index 0)."""
        loops = schedule_loop_indices(schedule, self.num_calls)
        return self._score(schedule.name, schedule.checkpoints, schedule.step_base, loops)

    def propose(self, budget: int, step_base: int = 1, name: str | None = None) -> ScheduleScore:
        """The ``budget`` checkpoints with the least drift (exact optimum), in ``step_base`` numbering."""
        self.check_budget(budget)
        found = optimal_checkpoints(self.cost_matrix(), budget)
        steps = to_step_numbers(found.loop_indices, step_base)
        return self._score(name or f"auto:{budget}", steps, step_base, found.loop_indices)

    def uniform(self, budget: int, step_base: int = 1) -> ScheduleScore:
        """``budget`` evenly spaced checkpoints from loop index 0: a baseline for the proposal."""
        self.check_budget(budget)
        loops = tuple(sorted({int(round(i * self.num_calls / budget)) for i in range(budget)}))
        return self._score(f"uniform:{budget}", to_step_numbers(loops, step_base), step_base, loops)

    def check_budget(self, budget: int) -> None:
        check_int("checkpoint budget", budget, 1, self.num_calls, hint="the U-Net calls of the run")

    def compare(self, budget: int, step_base: int = 1) -> list[ScheduleScore]:
        """The proposal for ``budget``, an evenly spaced list of that size, and the paper's lists.

        Each score carries ``best_drift``: the optimum with the same number of checkpoints.
        """
        scores = [self.propose(budget, step_base), self.uniform(budget, step_base)]
        scores += [self.evaluate(parse_schedule(name, step_base)) for name in PAPER_SCHEDULES]
        cost = self.cost_matrix()
        best: dict[int, float] = {}
        for sc in scores:
            if sc.num_checkpoints not in best:
                best[sc.num_checkpoints] = optimal_checkpoints(cost, sc.num_checkpoints).drift
        return [replace(sc, best_drift=best[sc.num_checkpoints]) for sc in scores]

    def to_dict(self) -> dict:
        """Everything, JSON-ready (NaN written as null)."""
        per_step = []
        mean_merged = self.merged.mean(axis=0)
        for i, t in enumerate(self.timesteps):
            row = self.consecutive[i]
            per_step.append({
                "loop_index": i,
                "timestep": t,
                "merged": {str(s): float(mean_merged[i, s]) for s in range(self.num_sites)},
                "jaccard_prev": {str(s): _num(row[s]) for s in range(self.num_sites)},
                "mean_jaccard_prev": _num(float(np.mean(row))) if i > 0 else None,
            })
        return {
            "tracking": self.config.to_dict(),
            "inputs": self.inputs,
            "num_calls": self.num_calls,
            "timesteps": list(self.timesteps),
            "sites": [{"index": s.index, "path": s.path, "grid": list(g), "num_tokens": g[0] * g[1]}
                      for s, g in zip(self.sites, self.grids)],
            "merged_fraction": self.merged_fraction,
            "per_step": per_step,
            "merged_per_run": self.merged.tolist(),
            "distance": [[[_num(v) for v in row] for row in site] for site in self.distance],
        }


def _num(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def analyze_pairs(
    unet: torch.nn.Module,
    config: TrackingConfig,
    text_embeddings: Sequence[torch.Tensor] | None = None,
    inputs: str | None = None,
    progress: bool = False,
) -> PairAnalysis:
    """Track pairs over one generation per entry of ``text_embeddings`` ([2, L, D] each: uncond, cond).

    Without embeddings, one generation with seeded random embeddings of the
    U-Net's text width (``cross_attention_dim``) is tracked.
    """
    if text_embeddings is None:
        dim = int(getattr(unet.config, "cross_attention_dim", 768))
        text_embeddings = [random_text_embeddings(dim, 77, config.seed)]
        inputs = inputs or f"random text embeddings (seed {config.seed}, 77 x {dim}); no text encoder"
    if not text_embeddings:
        raise CatomeError("no text embeddings to track: give at least one (uncond, cond) pair")
    traces: list[PairTrace] = []
    bars: list[Progress] = []

    def tick(k: int, n: int, generation: int) -> None:
        if not bars:  # the scheduler's call count (PLMS repeats one step) is known at the first call
            bars.append(Progress(len(text_embeddings) * n, "analyze"))
        bars[0].update(note=f"generation {generation + 1}, U-Net call {k + 1}/{n}")

    try:
        for i, emb in enumerate(text_embeddings):
            if len(text_embeddings) > 1:
                logger.info("tracking pairs: generation %d of %d", i + 1, len(text_embeddings))
            on_step = (lambda k, n, g=i: tick(k, n, g)) if progress else None
            traces.append(track_pairs(unet, config, emb, on_step=on_step))
    finally:
        for bar in bars:
            bar.close()
    first = traces[0]
    return PairAnalysis(
        config=config,
        sites=tuple(first.sites),
        grids=tuple(first.grids),
        timesteps=tuple(first.timesteps),
        distance=np.mean([tr.distances() for tr in traces], axis=0),
        consecutive=np.mean([tr.consecutive() for tr in traces], axis=0),
        merged=np.stack([tr.merged for tr in traces]),
        merged_fraction=float(np.mean([merged_fraction(tr) for tr in traces])),
        inputs=inputs or f"{len(traces)} text embedding pair(s)",
    )
