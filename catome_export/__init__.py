"""catome-export: Cached Adaptive Token Merging (CA-ToMe) for Stable Diffusion U-Nets,
exported to staged dynamic-shape ONNX graphs and TensorRT / ONNX Runtime engines.

Heavy optional packages (onnxruntime, tensorrt) are imported lazily, so
``import catome_export`` works on a CPU-only machine.
"""

from __future__ import annotations

from typing import Any

from catome_export._version import __version__
from catome_export.errors import CatomeError

__all__ = ["__version__", "CatomeError", "apply_catome", "apply_tome", "match_tokens", "MergePlan", "load_unet"]


def __getattr__(name: str) -> Any:  # lazy re-exports keep `import catome_export` cheap
    if name == "apply_catome":  # the workflow layer's: it also calibrates auto:K schedules
        from catome_export.workflows.eager import apply_catome

        return apply_catome
    if name == "apply_tome":
        from catome_export.eager import apply_tome

        return apply_tome
    if name in ("match_tokens", "MergePlan"):
        from catome_export import merging

        return getattr(merging, name)
    if name == "load_unet":
        from catome_export.models import load_unet

        return load_unet
    raise AttributeError(f"module 'catome_export' has no attribute {name!r}")
