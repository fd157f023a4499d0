"""Backend selection: ``auto`` picks TensorRT, then ONNX Runtime CUDA, then ONNX Runtime CPU."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from catome_export.errors import CatomeError
from catome_export.tensorrt_support import (
    POLYGRAPHY_SUPPORTED, TRT_INSTALL_HINT, TRT_PIP, TRT_SUPPORTED, import_tensorrt, require_polygraphy,
    trt_version_problem, version_tuple,
)

__all__ = ["BACKEND_NAMES", "BackendChoice", "choose_backend", "TRT_INSTALL_HINT", "TRT_PIP", "TRT_SUPPORTED",
           "import_tensorrt", "trt_version_problem", "version_tuple", "POLYGRAPHY_SUPPORTED", "require_polygraphy"]

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


def choose_backend(requested: str = "auto", *, engine_backend: str | None = None,
                   device: object = None) -> BackendChoice:
    """Resolve a requested backend name to one that can run here, or raise CatomeError saying what to install.

    The one place a run backend is chosen. With ``engine_backend`` (what the engine folder holds, ``ort`` or
    ``trt``), ``auto`` does not pick TensorRT for a folder without TensorRT plans; with a CPU ``device`` (a
    ``torch.device`` or its name), ``auto`` and ``ort`` take ONNX Runtime's CPU provider whatever else is here.
    """
    choice = _choose(requested)
    if requested == "auto" and choice.name == "trt" and engine_backend is not None and engine_backend != "trt":
        choice = _choose("ort")
        choice = BackendChoice(choice.name, f"the engine folder holds no TensorRT plans: {choice.reason}")
    if requested in ("auto", "ort") and choice.name != "ort-cpu" and device is not None \
            and str(device).split(":")[0] == "cpu":
        choice = _choose("ort-cpu")  # a CPU device asked for: the CPU provider, whatever else is here
    return choice


def _choose(requested: str) -> BackendChoice:
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
