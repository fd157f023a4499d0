"""Host memory checks before work that needs a known amount of it (Linux ``/proc/meminfo``; skipped elsewhere).

A check here is a floor, not a forecast: it refuses work that cannot fit
(the weights alone exceed what the machine has available) before it starts,
instead of letting the kernel kill the process after minutes of work. Work
that passes can still need more (activations, ONNX Runtime's own copies).
"""

from __future__ import annotations

from pathlib import Path

from catome_export.errors import CatomeError

MEMINFO = Path("/proc/meminfo")
MARGIN = 1 << 30
"""Bytes kept free beyond the estimate: the interpreter, torch's and ONNX Runtime's libraries, one call's activations."""
ORT_CPU_ENGINE_FACTOR = 1.5
"""Memory of an engine in ONNX Runtime CPU per byte of its weights, with room for both models' activations during a
comparison. Measured on SDXL in fp32 (10.3 GB of weights): a process running only the engine at 1024 px, batch 2
held 12.9 GB (1.26 times the weights, the interpreter and one call's activations included); a build's verification
(the eager U-Net and the engine) was stopped by the kernel at 24.9 GB, so the two need more than 2.4 times the
weights."""


def verify_need(weight_bytes: int) -> int:
    """Bytes that comparing an engine with eager PyTorch on the CPU needs at least: the eager U-Net and the engine
    in ONNX Runtime, both resident (:data:`ORT_CPU_ENGINE_FACTOR`)."""
    return int(weight_bytes * (1 + ORT_CPU_ENGINE_FACTOR))


def available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (memory the kernel can hand out without swapping), or None
    where it cannot be read."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_available(need: int, what: str, fix: str, *, held: int = 0) -> None:
    """CatomeError when ``what`` needs more than the available memory (plus ``held``: bytes this process holds now
    and frees before that work), naming ``need`` and ``fix``. Does nothing where availability is unknown."""
    available = available_bytes()
    if available is None:
        return
    if need + MARGIN > available + held:
        raise CatomeError(f"{what} needs at least {gb(need + MARGIN)} of memory, and this machine has "
                          f"{gb(available + held)} available: {fix}")
