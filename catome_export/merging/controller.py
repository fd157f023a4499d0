"""The merge controller: per-site plan caches driven by the step schedule.

One controller serves one U-Net (eager patch or engine runtime), so both
paths share the exact same caching behaviour:

- ``begin_step(timestep)`` is called once per U-Net call and returns the
  loop index (see :class:`StepCounter`); a new generation clears every cache.
- ``plan_for(site, x, grid)`` returns the site's plan for this step: on a
  checkpoint step, or when the site has no usable cache, it matches on ``x``
  (the block's input before norm1) and caches the plan; otherwise it returns
  the cached plan (same r, same pairs) for the new x.
- ``set_matcher(fn)`` replaces the matching itself (``fn(site, x, grid) ->
  MergePlan``) while the caching stays as it is: a reference run on given
  plans, or a recorder of what was matched.
"""

from __future__ import annotations

from typing import Callable

import torch

from catome_export.merging.matching import match_tokens, partition
from catome_export.merging.plan import MergePlan
from catome_export.merging.settings import MergeSettings
from catome_export.merging.steps import StepCounter, StepRecord


PlanMatcher = Callable[[int, torch.Tensor, tuple[int, int]], MergePlan]
"""``(site, x, grid) -> plan``: what a site uses on a step where it matches (see ``set_matcher``)."""


class MergeController:
    """Per-site plan caches and step numbering (shared by the eager patch and the runtime)."""

    def __init__(self, settings: MergeSettings, num_sites: int, validate: bool = False) -> None:
        self.settings = settings
        self.num_sites = num_sites
        self.validate = validate
        self.counter = StepCounter()
        self.history: list[StepRecord] = []
        self._cache: dict[int, MergePlan] = {}
        self._grids: dict[int, tuple[int, int]] = {}
        self._generator: torch.Generator | None = None
        self._step: int = -1
        self._checkpoint = True
        self._matcher: PlanMatcher | None = None
        self.reset()

    # -- step bookkeeping -------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cached plan and start step numbering at 0 (a new generation)."""
        self.counter.reset()
        self._clear()

    def _clear(self) -> None:
        self._cache.clear()
        self._grids.clear()
        self.history = []
        self._generator = None

    def set_step(self, index: int) -> None:
        """Pin the 0-based loop index of the next U-Net call (custom loops)."""
        self.counter.set_step(index)

    def begin_step(self, timestep: float | None = None) -> int:
        """Start one U-Net call; returns its loop index."""
        step = self.counter.advance(timestep)
        if self.counter.new_generation:
            self._clear()
        self._step = step
        self._checkpoint = self.settings.schedule.is_checkpoint(step)
        self.history.append(StepRecord(step))
        return step

    @property
    def step(self) -> int:
        return self._step

    @property
    def last(self) -> StepRecord | None:
        return self.history[-1] if self.history else None

    # -- plans ------------------------------------------------------------------------
    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        if not self.settings.random_dst:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.settings.seed)
        return self._generator

    def compute_plan(self, x: torch.Tensor, grid: tuple[int, int]) -> MergePlan:
        """Match on ``x`` [B, N, C] with this controller's settings (no caching).

        The one matching call of the engine's controller and the eager patch
        alike, r rounded down to a multiple of ``settings.r_multiple`` inside it.
        """
        s = self.settings
        gen = self._generator_for(x.device) if x.shape[0] % 2 == 0 else None
        if s.merge_fraction is not None:
            num_src = partition(grid, s.stride, None, x.device)[0].numel()
            return match_tokens(x, grid, num_merged=int(round(s.merge_fraction * num_src)), stride=s.stride,
                                generator=gen, multiple=s.r_multiple)
        return match_tokens(x, grid, threshold=s.threshold, ratio=s.ratio, stride=s.stride, generator=gen,
                            multiple=s.r_multiple)

    def partition_for(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The (src, dst) token ids that :meth:`compute_plan` on ``x`` would use next.

        Does not advance the random-dst generator: call it before the matching it describes.
        """
        gen = self._generator_for(x.device) if x.shape[0] % 2 == 0 else None
        if gen is not None:
            probe = torch.Generator(device=gen.device)
            probe.set_state(gen.get_state())
            gen = probe
        return partition(grid, self.settings.stride, gen, x.device)

    def set_matcher(self, matcher: PlanMatcher | None) -> None:
        """Use ``matcher(site, x, grid)`` instead of :meth:`compute_plan` where a site matches; None restores it.

        The cache rules stay: the matcher's plan is cached and reused on the
        steps that follow, exactly like a computed one (and validated when the
        controller validates). It survives :meth:`reset`.
        """
        self._matcher = matcher

    def _usable(self, site: int, batch: int, num_tokens: int, grid: tuple[int, int],
                device: torch.device) -> MergePlan | None:
        cached = self._cache.get(site)
        if (cached is not None and cached.batch_size == batch and cached.num_tokens == num_tokens
                and cached.unmerge_idx.device == device and self._grids.get(site) == tuple(grid)):
            return cached
        return None

    def cached_plan(self, site: int, batch: int, grid: tuple[int, int], device: torch.device) -> MergePlan | None:
        """The cached plan ``site`` reuses at this step, recorded as reused; None if the site must match.

        For callers that run a cached step without the block inputs (a
        captured CUDA graph of the whole chain): when every site returns a
        plan, the step needs no matching at all.
        """
        if self._checkpoint:
            return None
        plan = self._usable(site, batch, grid[0] * grid[1], grid, torch.device(device))
        if plan is not None and self.history:
            self.history[-1].merged[site] = plan.num_merged
            self.history[-1].matched[site] = False
        return plan

    def plan_for(self, site: int, x: torch.Tensor, grid: tuple[int, int]) -> MergePlan:
        """The plan of ``site`` for the current step (matched now, or reused from the cache)."""
        cached = self._usable(site, x.shape[0], x.shape[1], grid, x.device)
        matched = self._checkpoint or cached is None
        if matched:
            plan = self.compute_plan(x, grid) if self._matcher is None else self._matcher(site, x, grid)
            if self.validate:
                plan.validate(x.shape[0], x.shape[1])
            self._cache[site] = plan
            self._grids[site] = (int(grid[0]), int(grid[1]))
        else:
            plan = cached  # type: ignore[assignment]
        if self.history:
            self.history[-1].merged[site] = plan.num_merged
            self.history[-1].matched[site] = matched
        return plan
