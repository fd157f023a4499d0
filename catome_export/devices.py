"""Device names to ``torch.device``: the one place that reads ``--device`` and ``device=`` arguments."""

from __future__ import annotations

import os

import torch

from catome_export.errors import CatomeError

DEVICE_TYPES = ("cpu", "cuda")
"""The device types this project runs on."""


def parse_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, with a CatomeError for a name torch does not know."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise CatomeError(f"unknown device {device!r}: use auto, cpu or cuda[:N]") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``auto``: cuda when available, else cpu; otherwise a usable cpu or cuda[:N] device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = parse_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CatomeError("no CUDA device is usable here (CPU-only torch or no GPU): use --device cpu")
    if dev.type not in DEVICE_TYPES:
        raise CatomeError(f"unsupported device {device!r}: use cpu or cuda[:N]")
    return dev


def load_average() -> float | None:
    """The machine's 1-minute load average, or None where the OS does not report one (timings taken while it
    exceeds the CPU count are marked busy)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
