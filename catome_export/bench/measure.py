"""Timing benchmark rows: warm-up, cached steps, checkpoint steps, and the controller's share.

Two protocols. :func:`measure_interleaved` (the default) times every row of
one shape in rounds: a warm-up call per row first (a checkpoint, which fills
the plan caches), then ``repeats`` rounds in which every row, in an order
rotated from round to round, runs one timed checkpoint call (a new
generation: every site matches) followed by one timed cached call (plans
reused, no matching). Slow changes in the machine's load then hit every row
alike, which matters on a shared machine. :func:`measure` times one row at a
time (less memory: one backend loaded at a time):

1. a new generation starts and ``warmup`` calls run untimed; the first is a
   checkpoint (empty caches: every site matches and caches its plan);
2. ``repeats`` timed calls continue the generation. With the benchmark's
   schedule (a checkpoint at loop index 0 only) they are cached steps: the
   plans are reused, no matching runs. ``eager-tome`` matches at every step;
3. ``checkpoint_repeats`` timed calls each start a new generation first
   (untimed), so each of them matches at every site.

Every timed call records its wall time (synchronised on CUDA), the time in
the merge controller, r per site and, for engines, the per-stage times.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from catome_export.bench.targets import CallStats, Target
from catome_export.bench.timing import Summary, timed
from catome_export.merging import MergeSettings, Schedule

logger = logging.getLogger(__name__)

BENCH_SCHEDULE = Schedule("bench", (0,), step_base=0)
"""Matching at loop index 0 only: the warm-up call is the checkpoint, every timed call after it is cached."""
TIMESTEP = 500.0
"""Timestep of every timed call (constant, so the step counter never sees a new generation)."""


@dataclass
class Inputs:
    """One shape's U-Net inputs, on the benchmark device."""

    sample: torch.Tensor
    timestep: torch.Tensor
    text: torch.Tensor
    added: dict[str, torch.Tensor] | None = None
    """SDXL-style added conditioning (``added_cond_kwargs``: ``text_embeds``, ``time_ids``), None for SD 1.x/2.x."""

    @property
    def batch(self) -> int:
        return int(self.sample.shape[0])

    @property
    def latent_hw(self) -> tuple[int, int]:
        return int(self.sample.shape[-2]), int(self.sample.shape[-1])


@dataclass
class Phase:
    """Timed calls of one kind (cached or checkpoint)."""

    step_ms: list[float] = field(default_factory=list)
    calls: list[CallStats] = field(default_factory=list)

    def add(self, ms: float, stats: CallStats) -> None:
        self.step_ms.append(ms)
        self.calls.append(stats)

    @property
    def summary(self) -> Summary | None:
        return Summary.of(self.step_ms) if self.step_ms else None

    def controller_ms(self) -> float | None:
        return float(statistics.median(c.controller_ms for c in self.calls)) if self.calls else None

    def stage_ms(self) -> list[float] | None:
        """Median per-stage times, where the target records them."""
        per_call = [c.stage_ms for c in self.calls if c.stage_ms]
        if not per_call or len({len(s) for s in per_call}) != 1:
            return None
        return [float(statistics.median(col)) for col in zip(*per_call)]

    def outside_stages_ms(self) -> float | None:
        """Median of (step time - sum of stage times): controller, plan feeding, input checks, chain walk."""
        vals = [ms - sum(c.stage_ms) for ms, c in zip(self.step_ms, self.calls) if c.stage_ms]
        return float(statistics.median(vals)) if vals else None

    def all_matched(self) -> bool:
        return bool(self.calls) and all(c.matched and all(c.matched.values()) for c in self.calls)

    def none_matched(self) -> bool:
        return all(not any(c.matched.values()) for c in self.calls)


@dataclass
class RowTiming:
    """What :func:`measure` found for one row."""

    cached: Phase
    checkpoint: Phase
    merged: dict[int, int]
    loop: dict[str, Any] | None = None


def _call(target: Target, inputs: Inputs, phase: Phase | None) -> None:
    out: list[float] = []
    with timed(target.device, out):
        target(inputs.sample, inputs.timestep, inputs.text, inputs.added)
    if phase is not None:
        phase.add(out[0], target.last_call())


def measure(target: Target, settings: MergeSettings | None, inputs: Inputs, *, repeats: int, warmup: int,
            checkpoint_repeats: int) -> RowTiming:
    """Time ``target`` with ``settings`` on ``inputs`` (see the module docstring)."""
    target.configure(settings)
    target.new_generation()
    for _ in range(warmup):
        _call(target, inputs, None)
    cached = Phase()
    for _ in range(repeats):
        _call(target, inputs, cached)
    checkpoint = Phase()
    if target.merges:
        for _ in range(checkpoint_repeats):
            target.new_generation()
            _call(target, inputs, checkpoint)
        _check_phases(target, settings, cached, checkpoint)
    merged = dict(cached.calls[-1].merged) if cached.calls else {}
    return RowTiming(cached, checkpoint, merged)


@dataclass
class Job:
    """One row to time: a target and its merge settings (None for targets that do not merge)."""

    target: Target
    settings: MergeSettings | None


def _check_phases(target: Target, settings: MergeSettings | None, cached: Phase, checkpoint: Phase) -> None:
    if settings is not None and settings.schedule is BENCH_SCHEDULE and not cached.none_matched():
        logger.warning("%s: some timed cached calls ran matching; their times include it", target.name)
    if checkpoint.calls and not checkpoint.all_matched():
        logger.warning("%s: some checkpoint calls did not match at every site", target.name)


def interleaved_calls(jobs: list[Job], repeats: int, warmup: int) -> int:
    """U-Net calls :func:`measure_interleaved` makes: each job's warm-ups, then per round a checkpoint and a cached
    call per merging job and a cached call per other job."""
    return len(jobs) * warmup + repeats * _round_calls(jobs)


def _round_calls(jobs: list[Job]) -> int:
    """U-Net calls of one interleaved round: a checkpoint and a cached call per merging job, a cached call else."""
    return sum(2 if job.target.merges else 1 for job in jobs)


def measure_interleaved(jobs: list[Job], inputs: Inputs, *, repeats: int, warmup: int,
                        tick: Callable[[str, int], None] | None = None) -> list[RowTiming]:
    """Time ``jobs`` in rotated rounds of (checkpoint call, cached call) each (see the module docstring).

    ``tick(note, calls)`` is called after each job's warm-up and after each round with the number of U-Net calls
    made since the last tick (:func:`interleaved_calls` in all), so that progress and its ETA count calls, and a
    round of many calls is not taken for one warm-up call."""
    timings = [RowTiming(Phase(), Phase(), {}) for _ in jobs]
    for k, job in enumerate(jobs):
        job.target.configure(job.settings)
        job.target.new_generation()
        for _ in range(warmup):
            _call(job.target, inputs, None)
        job.target.suspend()
        if tick is not None:
            tick(f"warm-up of row {k + 1}/{len(jobs)}", warmup)
    n = len(jobs)
    for rnd in range(repeats):
        for i in [(rnd + k) % n for k in range(n)]:
            job, timing = jobs[i], timings[i]
            job.target.configure(job.settings)
            if job.target.merges:
                job.target.new_generation()
                _call(job.target, inputs, timing.checkpoint)
            _call(job.target, inputs, timing.cached)
            job.target.suspend()
        if tick is not None:
            tick(f"round {rnd + 1}/{repeats}", _round_calls(jobs))
    for job, timing in zip(jobs, timings):
        _check_phases(job.target, job.settings, timing.cached, timing.checkpoint)
        timing.merged = dict(timing.cached.calls[-1].merged) if timing.cached.calls else {}
    return timings


def measure_loop(target: Target, settings: MergeSettings | None, inputs: Inputs, steps: int) -> dict[str, Any]:
    """Time a ``steps``-call denoising loop (timesteps 999 -> 0) with ``settings``' own schedule."""
    target.configure(settings)
    target.new_generation()
    timesteps = torch.linspace(999.0, 0.0, steps).tolist()
    out: list[float] = []
    checkpoints = 0
    controller = 0.0
    for t in timesteps:
        ts = torch.full_like(inputs.timestep, t)
        with timed(target.device, out):
            target(inputs.sample, ts, inputs.text, inputs.added)
        stats = target.last_call()
        checkpoints += int(any(stats.matched.values()))
        controller += stats.controller_ms
    total = sum(out)
    return {"steps": steps, "schedule": settings.schedule.describe() if settings is not None else None,
            "checkpoint_steps": checkpoints, "total_ms": round(total, 3), "mean_ms": round(total / steps, 3),
            "controller_ms": round(controller, 3)}
