"""Step numbering shared by the eager patch and the runtime.

A U-Net call is one denoising step (classifier-free guidance batches both
halves into one call in diffusers pipelines). The counter numbers calls
0, 1, 2, ... within a generation and starts a new generation when told
(``reset``), when the caller pins the index (``set_step``), or when the
timestep rises compared with the previous call (diffusion timesteps never
rise within a generation; PLMS repeats one, which still counts as a step).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol

from catome_export.checks import check_int


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
