"""Which TensorRT this project supports, and importing it with an error that says how to install one.

Used by the export layer (building plans) and the backends (running them);
``tensorrt`` itself is imported only by :func:`import_tensorrt`.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from catome_export.errors import CatomeError

TRT_SUPPORTED = ">=10.1,<12"
"""TensorRT releases this project supports (the ``[trt]`` extra says the same): 10.1 and later 10.x, and 11.x.
10.1 is the first with ``device_memory_size_v2`` / ``set_device_memory(ptr, size)``; 11 builds fp16 engines only
from fp16 graphs (strong typing), which is how this project builds them on both."""

TRT_PIP = f"pip install 'tensorrt{TRT_SUPPORTED}' --extra-index-url https://pypi.nvidia.com"
"""Installs a supported TensorRT on its own (NVIDIA's index hosts the CUDA-specific wheels)."""

TRT_INSTALL_HINT = (f"install it on a machine with an NVIDIA GPU (pip install 'catome-export[trt]', or {TRT_PIP}), "
                    "or use --backend ort")

POLYGRAPHY_SUPPORTED = ">=0.50"
"""Polygraphy releases the TensorRT path is tested with (in the ``[trt]`` extra). 0.49.x reads each layer's
``precision_is_set`` in ``CreateConfig`` without a guard, and TensorRT 11 removed that member, so 0.49 cannot
build for TensorRT 11 (:func:`polygraphy_problem`); 0.50 and later skip it."""

POLYGRAPHY_FOR_TRT11 = (0, 50)
"""Oldest Polygraphy release that builds for TensorRT 11."""


def require_polygraphy(way_out: str = "use --backend ort") -> None:
    """Raise a CatomeError saying how to install Polygraphy unless it is importable (the TensorRT path needs it).

    ``way_out``: the other path the message offers (a build's is ``build with --engine-kind ort``)."""
    if importlib.util.find_spec("polygraphy") is None:
        raise CatomeError("the TensorRT path needs Polygraphy, which is not installed: pip install "
                          f"'catome-export[trt]' (or pip install 'polygraphy{POLYGRAPHY_SUPPORTED}'), or {way_out}")


def polygraphy_version() -> str:
    """``polygraphy.__version__`` ("unknown" when the installed package does not say)."""
    import polygraphy

    return str(getattr(polygraphy, "__version__", "unknown"))


def polygraphy_problem(trt_version: str, polygraphy_ver: str) -> str | None:
    """Why this Polygraphy cannot build engines with TensorRT ``trt_version``, or None when the pair works.

    Polygraphy before 0.50 reads ``ILayer.precision_is_set`` for every layer of the network in ``CreateConfig``;
    TensorRT 11 has no such member, so every build would end in an AttributeError.
    """
    trt_parts, poly_parts = version_tuple(trt_version), version_tuple(polygraphy_ver)
    if not trt_parts or trt_parts[0] < 11 or (poly_parts and poly_parts[:2] >= POLYGRAPHY_FOR_TRT11):
        return None
    need = ".".join(str(v) for v in POLYGRAPHY_FOR_TRT11)
    return (f"Polygraphy {polygraphy_ver} cannot build TensorRT {trt_version} engines (it reads per-layer precisions, "
            f"which TensorRT 11 removed): upgrade it, pip install 'polygraphy>={need}'")


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
