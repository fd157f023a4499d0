"""Backend selection: ``auto`` picks TensorRT, then ONNX Runtime CUDA, then ONNX Runtime CPU."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from catome_export.errors import CatomeError

BACKEND_NAMES = ("auto", "trt", "ort", "ort-cuda", "ort-cpu", "torch")


@dataclass(frozen=True)
class BackendChoice:
    name: str
    """Resolved backend: ``trt``, ``ort-cuda``, ``ort-cpu`` or ``torch``."""
    reason: str
    """Why it was chosen, for the log line users see."""


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _ort_providers() -> list[str]:
    if not _has("onnxruntime"):
        return []
    import onnxruntime

    return list(onnxruntime.get_available_providers())


TRT_SUPPORTED = ">=10.1,<12"
"""TensorRT releases this project supports (the ``[trt]`` extra says the same): 10.1 and later 10.x, and 11.x.
10.1 is the first with ``device_memory_size_v2`` / ``set_device_memory(ptr, size)``; 11 builds fp16 engines only
from fp16 graphs (strong typing), which is how this project builds them on both."""

TRT_PIP = f"pip install 'tensorrt{TRT_SUPPORTED}' --extra-index-url https://pypi.nvidia.com"
"""Installs a supported TensorRT on its own (NVIDIA's index hosts the CUDA-specific wheels)."""

TRT_INSTALL_HINT = (f"install it on a machine with an NVIDIA GPU (pip install 'catome-export[trt]', or {TRT_PIP}), "
                    "or use --backend ort")

POLYGRAPHY_SUPPORTED = ">=0.49"
"""Polygraphy releases the TensorRT path is tested with (in the ``[trt]`` extra)."""


def require_polygraphy() -> None:
    """Raise a CatomeError saying how to install Polygraphy unless it is importable (the TensorRT path needs it)."""
    if not _has("polygraphy"):
        raise CatomeError("the TensorRT path needs Polygraphy, which is not installed: pip install "
                          f"'catome-export[trt]' (or pip install 'polygraphy{POLYGRAPHY_SUPPORTED}'), or use --backend ort")


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string ("1.20.1" -> (1, 20, 1); "1.21.0.dev2025" -> (1, 21, 0))."""
    parts: list[int] = []
    for piece in str(version).split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):
            break
    return tuple(parts)


def trt_version_problem(version: str) -> str | None:
    """Why TensorRT ``version`` cannot be used here (too old, too new, unreadable), or None when it is supported."""
    parts = version_tuple(version)
    if not parts:
        return f"TensorRT {version!r} has a version this project cannot read; it supports tensorrt{TRT_SUPPORTED}"
    major, minor = parts[0], parts[1] if len(parts) > 1 else 0
    if (major, minor) < (10, 1):
        return f"TensorRT {version} is too old: this project supports tensorrt{TRT_SUPPORTED}"
    if major >= 12:
        return f"TensorRT {version} is newer than this project supports (tensorrt{TRT_SUPPORTED})"
    return None


def import_tensorrt() -> Any:
    """Import ``tensorrt`` (10.1 or later 10.x, or 11.x), or raise CatomeError saying how to install one.

    A broken install (missing CUDA libraries) raises more than ImportError;
    every failure becomes the same user-facing error.
    """
    try:
        import tensorrt
    except Exception as exc:  # ImportError, OSError from a missing libnvinfer, ...
        detail = "" if isinstance(exc, ModuleNotFoundError) else f" ({type(exc).__name__}: {exc})"
        raise CatomeError(f"TensorRT is not installed or not importable{detail}: {TRT_INSTALL_HINT}") from None
    version = str(getattr(tensorrt, "__version__", "0"))
    problem = trt_version_problem(version)
    if problem is not None:
        raise CatomeError(f"{problem}: {TRT_PIP} (or pip install 'catome-export[trt]')")
    return tensorrt


def choose_backend(requested: str = "auto") -> BackendChoice:
    """Resolve a requested backend name to one that can run here, or raise CatomeError saying what to install."""
    if requested not in BACKEND_NAMES:
        raise CatomeError(f"unknown backend {requested!r}: use one of {', '.join(BACKEND_NAMES)}")
    if requested == "torch":
        return BackendChoice("torch", "eager torch stages (requested)")
    cuda = _cuda_available()
    providers = _ort_providers()
    if requested == "trt":
        if not _has("tensorrt"):
            raise CatomeError(f"TensorRT is not installed: {TRT_INSTALL_HINT}")
        if not cuda:
            raise CatomeError("TensorRT needs a CUDA device and a CUDA build of torch; use --backend ort on this machine")
        return BackendChoice("trt", "TensorRT (requested)")
    if requested in ("ort", "ort-cuda", "ort-cpu"):
        if not providers:
            raise CatomeError("ONNX Runtime is not installed: pip install 'catome-export[ort]' (CPU) or '[ort-gpu]'")
        if requested == "ort-cuda" or (requested == "ort" and cuda and "CUDAExecutionProvider" in providers):
            if "CUDAExecutionProvider" not in providers or not cuda:
                raise CatomeError("ONNX Runtime's CUDA provider is not usable here: pip install "
                                  "'catome-export[ort-gpu]' on a machine with an NVIDIA GPU, or use --backend ort-cpu")
            return BackendChoice("ort-cuda", "ONNX Runtime, CUDA execution provider")
        return BackendChoice("ort-cpu", "ONNX Runtime, CPU execution provider")
    # auto
    if _has("tensorrt") and cuda:
        return BackendChoice("trt", "auto: TensorRT is installed and a CUDA device is present")
    if cuda and "CUDAExecutionProvider" in providers:
        return BackendChoice("ort-cuda", "auto: no TensorRT; ONNX Runtime CUDA provider available")
    if providers:
        why = "no CUDA device" if not cuda else "no TensorRT and no ORT CUDA provider"
        return BackendChoice("ort-cpu", f"auto: {why}; ONNX Runtime CPU")
    raise CatomeError("no backend can run here: pip install 'catome-export[ort]' (ONNX Runtime) "
                      "or 'catome-export[trt]' (TensorRT, NVIDIA GPU)")
