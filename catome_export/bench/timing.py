"""Wall-clock timing of U-Net calls: synchronised, summarised as median / min / p90."""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from catome_export.errors import CatomeError


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, out: list[float]) -> Iterator[None]:
    """Append the wall time of the block in ms to ``out``, synchronising ``device`` before and after."""
    synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        out.append((time.perf_counter() - start) * 1e3)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        raise CatomeError("no timings to summarise: use --repeats >= 1")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """Median, min and p90 of repeated timings (ms)."""

    median_ms: float
    min_ms: float
    p90_ms: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Summary":
        return cls(float(statistics.median(values)), float(min(values)), float(percentile(values, 90.0)),
                   len(values))

    def to_dict(self, prefix: str = "") -> dict[str, float | int]:
        return {f"{prefix}median_ms": round(self.median_ms, 3), f"{prefix}min_ms": round(self.min_ms, 3),
                f"{prefix}p90_ms": round(self.p90_ms, 3), f"{prefix}count": self.count}
