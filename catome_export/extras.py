"""The optional extras of ``pyproject.toml``: what each one enables, and checks that run before the work.

A command that needs an extra checks it first (``require("eval", "generate")``), so a missing package
is one line with the install command instead of a traceback after minutes of work. ``catome-export
doctor`` reports every extra (:func:`extra_status`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from catome_export.errors import CatomeError


@dataclass(frozen=True)
class Extra:
    """One ``pip install 'catome-export[name]'`` extra."""

    name: str
    modules: tuple[str, ...]
    """Modules that must import for it to count as installed."""
    enables: str
    """What it is for, in a few words."""

    @property
    def pip(self) -> str:
        return f"pip install 'catome-export[{self.name}]'"


EXTRAS: dict[str, Extra] = {e.name: e for e in (
    Extra("ort", ("onnxruntime",), "ONNX Runtime engines on the CPU: build's checks, verify, bench, the runtime"),
    Extra("ort-gpu", ("onnxruntime",), "ONNX Runtime engines on an NVIDIA GPU (CUDA execution provider)"),
    Extra("trt", ("tensorrt", "polygraphy"), "TensorRT engines (NVIDIA GPU)"),
    Extra("eval", ("transformers", "PIL", "scipy", "matplotlib"),
          "generate and eval (text encoder, images, FID/CLIP where their weights are cached), --plot"),
    Extra("test", ("pytest", "xdist", "hypothesis", "onnxruntime", "polygraphy", "transformers", "PIL", "scipy", "matplotlib",
                   "ray.serve", "DeepCache", "peft"),
          "the test suite"),
    Extra("serve", ("ray.serve", "PIL"), "serving engines over HTTP with Ray Serve"),
    Extra("lint", ("ruff", "mypy"), "the linters (ruff, mypy)"),
)}

NEEDS: dict[str, tuple[str, ...]] = {
    "generate": ("transformers", "PIL"),
    "eval": ("transformers", "PIL", "scipy"),
    "plot": ("matplotlib",),
}
"""What each feature imports, and (by :data:`FEATURE_EXTRA`) which extra brings it."""
FEATURE_EXTRA = {"generate": "eval", "eval": "eval", "plot": "eval"}


def missing_modules(modules: tuple[str, ...]) -> list[tuple[str, str]]:
    """(module, reason) for each module that does not import (a broken install counts as missing)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken install raises more than ImportError
            missing.append((name, f"{type(exc).__name__}: {exc}".splitlines()[0][:160]))
    return missing


def require(feature: str, what: str) -> None:
    """CatomeError with the install command unless what ``feature`` (``generate``, ``eval``, ``plot``) needs
    imports; ``what`` names the command or flag in the message."""
    missing = missing_modules(NEEDS[feature])
    if missing:
        extra = EXTRAS[FEATURE_EXTRA[feature]]
        names = ", ".join(_distribution(m) for m, _ in missing)
        raise CatomeError(f"{what} needs {names}, which {'is' if len(missing) == 1 else 'are'} not installed: "
                          f"{extra.pip}")


def _distribution(module: str) -> str:
    return {"PIL": "pillow", "ray.serve": "ray[serve]"}.get(module, module)


@dataclass(frozen=True)
class ExtraStatus:
    extra: Extra
    ok: bool
    detail: str


def extra_status(name: str) -> ExtraStatus:
    """Whether an extra's packages import here (``ort-gpu`` also needs the CUDA execution provider)."""
    extra = EXTRAS[name]
    missing = missing_modules(extra.modules)
    if missing:
        return ExtraStatus(extra, False, "missing " + ", ".join(_distribution(m) for m, _ in missing))
    if name == "ort-gpu":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return ExtraStatus(extra, False, "onnxruntime has no CUDA execution provider (the CPU build is installed)")
    return ExtraStatus(extra, True, "installed")
