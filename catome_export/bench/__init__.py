"""Benchmarks: latency of eager PyTorch, eager ToMe / CA-ToMe and the staged engines, and a FLOP model.

``run_bench(BenchConfig(...))`` measures per U-Net call (median / min / p90
over cached steps after a warm-up checkpoint call, plus checkpoint steps and
the controller's share of both) and returns a :class:`BenchResult` that
writes the markdown table, the JSON file and the plot. :mod:`.flops` counts
the multiply-adds of a U-Net from its config, with and without merging.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BenchConfig", "BenchResult", "run_bench", "unet_macs", "ideal_speedup", "BACKENDS"]


def __getattr__(name: str) -> Any:  # lazy: the runner pulls in diffusers and the runtime
    if name in ("unet_macs", "ideal_speedup"):
        from catome_export.bench import flops

        return getattr(flops, name)
    if name in ("BenchConfig", "BACKENDS"):
        from catome_export.bench import config

        return getattr(config, name)
    if name in ("BenchResult", "run_bench"):
        from catome_export.bench import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'catome_export.bench' has no attribute {name!r}")
