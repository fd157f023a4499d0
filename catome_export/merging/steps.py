"""Step numbering and the step record shared by the eager patch and the runtime.

A U-Net call is one denoising step (classifier-free guidance batches both
halves into one call in diffusers pipelines). The counter numbers calls
0, 1, 2, ... within a generation and starts a new generation when told
(``reset``), when the caller pins the index (``set_step``), or when the
timestep rises compared with the previous call (diffusion timesteps never
rise within a generation; PLMS repeats one, which still counts as a step).

:class:`StepRecord` is the one record of a U-Net call: the merge controller
starts one per call, the runtime adds its timings, and generate's report,
serve's metrics and bench read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from catome_export.checks import check_int


@dataclass(frozen=True)
class StepRecord:
    """What one U-Net call did: merging per site and, where it was timed, where its time went.

    The merge controller starts one per call (``step``, ``merged``, ``matched``; an eager handle's
    ``history`` holds these, untimed). ``runtime.history`` adds the runtime's timings and feature-cache kind;
    generate's report (``Generation.steps``) holds the pipeline step's wall time in ``step_ms``.
    """

    step: int
    """0-based loop index in the current generation."""
    merged: dict[int, int] = field(default_factory=dict)
    """Site index -> r (tokens merged away) at this step."""
    matched: dict[int, bool] = field(default_factory=dict)
    """Site index -> True where matching ran (checkpoint or empty cache), False where the cache was reused."""
    step_ms: float = 0.0
    """Wall time of the call in ms: the runtime's U-Net call (on CUDA, synchronised at its end; NaN for a call
    that failed), or in generate's report the whole denoising step (U-Net call and scheduler update); 0 where
    nothing timed it (the eager patch's own history)."""
    controller_ms: float = 0.0
    """Time spent getting plans from the controller and feeding them (matching, cache look-ups); 0 where
    nothing timed it."""
    cached_features: bool = False
    """True when the call ran only the feature cache's shallow branch on the deep features of the last full call
    (DeepCache's cached step); False for a full call."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (site keys as strings, in site order)."""
        return {"step": self.step, "merged": {str(k): v for k, v in sorted(self.merged.items())},
                "matched": {str(k): v for k, v in sorted(self.matched.items())}, "step_ms": self.step_ms,
                "controller_ms": self.controller_ms, "cached_features": self.cached_features}


class StepCounter:
    """Loop-index bookkeeping for code that only sees U-Net calls."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new generation: the next call is loop index 0."""
        self._next = 0
        self._pinned: int | None = None
        self._last_t: float | None = None
        self.new_generation = True

    def set_step(self, index: int) -> None:
        """Pin the loop index of the next call (0-based); later calls count on from it."""
        self._pinned = check_int("step index", index, 0)

    def advance(self, timestep: float | None) -> int:
        """The loop index of this call. Sets ``new_generation`` when a generation starts here."""
        self.new_generation = False
        if self._pinned is not None:
            index = self._pinned
            self._pinned = None
            if index == 0:
                self.new_generation = True
        else:
            t = None if timestep is None or not math.isfinite(timestep) else float(timestep)
            if self._next == 0 or (t is not None and self._last_t is not None and t > self._last_t):
                index = 0
                self.new_generation = True
            else:
                index = self._next
        self._last_t = None if timestep is None else float(timestep)
        self._next = index + 1
        return index


class StepHistory(Protocol):
    """Anything that keeps the step records of its current generation: an eager handle, a runtime, an
    attachment of a runtime to a pipeline."""

    @property
    def history(self) -> Sequence[StepRecord]: ...


class _Resettable(Protocol):
    def reset(self) -> None: ...


class ResetOnCall:
    """Stands in for a diffusers pipeline's ``progress_bar`` method: resets ``target``, then calls the original.

    A pipeline's ``__call__`` opens its progress bar once, just before the
    denoising loop, so every generation starts at loop index 0 without a copy
    of the pipeline's code (used by the eager patch and by ``attach``).
    :meth:`install` puts it on a pipeline instance, :meth:`remove` takes it off
    and leaves the instance as it was.
    """

    def __init__(self, target: _Resettable, original: Callable[..., Any]) -> None:
        self.target = target
        self.original = original
        self._pipe: Any = None
        self._was_instance_attr = False
        self._previous: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.target.reset()
        return self.original(*args, **kwargs)

    @classmethod
    def install(cls, pipe: Any, target: _Resettable) -> "ResetOnCall | None":
        """Wrap ``pipe.progress_bar`` on the instance; None (nothing changed) when it has no such method."""
        original = getattr(pipe, "progress_bar", None)
        if not callable(original):
            return None
        hook = cls(target, original)
        instance_dict = getattr(pipe, "__dict__", {})
        hook._pipe = pipe
        hook._was_instance_attr = "progress_bar" in instance_dict
        hook._previous = instance_dict.get("progress_bar")
        object.__setattr__(pipe, "progress_bar", hook)
        return hook

    def remove(self) -> bool:
        """Put the pipeline's own ``progress_bar`` back; False (and nothing touched) when someone replaced
        this wrapper meanwhile."""
        pipe, self._pipe = self._pipe, None
        if pipe is None or pipe.__dict__.get("progress_bar") is not self:
            return False
        if self._was_instance_attr:
            object.__setattr__(pipe, "progress_bar", self._previous)
        else:
            del pipe.__dict__["progress_bar"]
        return True
