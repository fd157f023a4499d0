"""What a benchmark ran on: CPU, cores, threads, GPU, package versions, machine load."""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path
from typing import Any

import torch

from catome_export.devices import load_average  # noqa: F401  (re-exported: bench.device is where the bench reads machine facts)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    from catome_export.backends.ort import physical_cores as cores

    return cores()


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # a missing or broken optional package is simply not reported
        return None
    return str(getattr(mod, "__version__", "installed"))


def gpu_info(device: torch.device) -> dict[str, Any] | None:
    """Name, compute capability and memory of the CUDA device, or None on the CPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}


def device_info(device: torch.device, threads: int) -> dict[str, Any]:
    """The ``device`` block of a benchmark's JSON (load averages are added by the caller)."""
    return {
        "cpu": cpu_model(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "device": str(device),
        "gpu": gpu_info(device),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "tensorrt": _version("tensorrt"),
    }


def rss_gib() -> float | None:
    """Resident memory of this process in GiB (Linux ``/proc``), or None elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**30, 2)


def peak_rss_gib() -> float | None:
    """Peak resident memory of this process in GiB, or None where ``resource`` is missing."""
    try:
        import resource
    except ImportError:
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
