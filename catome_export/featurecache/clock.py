"""Which U-Net calls of a generation are full: DeepCache's rule, shared by the eager patch and the runtime."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from catome_export.errors import CatomeError
from catome_export.featurecache.settings import FeatureCacheSettings

Timesteps = Callable[[], Sequence[Any] | None]
"""Gives the scheduler's current timesteps (None where no scheduler is known)."""


def timestep_position(timesteps: Sequence[Any] | None, value: float | None, loop_index: int) -> int:
    """The call's position as DeepCache reads it: the first index of ``value`` in ``timesteps``
    (``list(scheduler.timesteps).index(t)``), or the loop index where no timesteps are known."""
    if timesteps is None or value is None:
        return loop_index
    for i, t in enumerate(timesteps):
        if float(t) == value:
            return i
    raise CatomeError(f"timestep {value:g} is not among the scheduler's timesteps: feature caching numbers calls "
                      "by their timestep's place in scheduler.timesteps (set them with scheduler.set_timesteps "
                      "before the loop, or pass timesteps=None to number calls by loop index)")


@dataclass
class CallRecord:
    """Whether one U-Net call ran in full or from the cache, and its DeepCache position."""

    full: bool
    position: int


@dataclass
class CacheClock:
    """Per generation: the start position and the kind of every call (full or cached)."""

    settings: FeatureCacheSettings
    timesteps: Timesteps = field(default=lambda: None)
    start: int | None = None
    calls: list[CallRecord] = field(default_factory=list)

    def reset(self) -> None:
        """A new generation: the next call sets the start."""
        self.start = None
        self.calls = []

    def begin(self, value: float | None, loop_index: int, cache_ready: bool) -> bool:
        """Decide the current call: True for full. ``cache_ready``: the cache holds what a cached call needs
        for this call's shapes (a call that finds none runs in full, where DeepCache would fail)."""
        position = timestep_position(self.timesteps(), value, loop_index)
        if self.start is None:
            self.start = position
        full = self.settings.is_full(position - self.start) or not cache_ready
        self.calls.append(CallRecord(full, position))
        return full
