"""catome-export: Cached Adaptive Token Merging (CA-ToMe) for Stable Diffusion U-Nets,
exported to staged dynamic-shape ONNX graphs and TensorRT / ONNX Runtime engines.

The public API is the names in ``__all__``::

    from catome_export import apply_catome, apply_tome, build_engine, Runtime, MergeSettings, CatomeError

They are imported on first use, so ``import catome_export`` stays light (no
torch, diffusers, onnx or onnxruntime until a name that needs them is used).
"""

from __future__ import annotations

import importlib
from typing import Any

from catome_export._version import __version__
from catome_export.errors import CatomeError

_LAZY = {
    "apply_catome": "catome_export.workflows.eager",  # it also calibrates auto:K schedules
    "apply_tome": "catome_export.eager",
    "apply_deepcache": "catome_export.eager",
    "FeatureCacheSettings": "catome_export.featurecache",
    "build_engine": "catome_export.workflows.build",  # build and verify
    "Runtime": "catome_export.runtime",
    "Engine": "catome_export.engine.engine",  # an engine folder, opened and checked once
    "MergeSettings": "catome_export.merging",
}
"""Public name -> the module it lives in."""

_OTHER = {
    "match_tokens": "catome_export.merging",
    "MergePlan": "catome_export.merging",
    "load_unet": "catome_export.models",
}
"""Names reachable here for existing code; new code imports them from their modules."""

__all__ = ["__version__", "CatomeError", *_LAZY]


def __getattr__(name: str) -> Any:  # lazy re-exports keep `import catome_export` cheap
    module = _LAZY.get(name) or _OTHER.get(name)
    if module is None:
        raise AttributeError(f"module 'catome_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
