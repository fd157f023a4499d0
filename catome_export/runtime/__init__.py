"""The controller runtime: a loaded engine driven step by step, callable as a diffusers U-Net.

``Runtime.load(engine_dir, backend="auto")`` reads the manifest, loads the
stages on a backend once, and builds the merge controller;
``runtime.unet(sample, timestep, encoder_hidden_states)`` runs one step.
``verify_engine`` compares an engine with eager CA-ToMe step by step.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Runtime", "RuntimeUNet", "StepRecord", "VerifyReport", "verify_engine"]


def __getattr__(name: str) -> Any:  # lazy: loading the runtime pulls in torch and the merging core
    if name in ("Runtime", "StepRecord"):
        from catome_export.runtime import runtime

        return getattr(runtime, name)
    if name == "RuntimeUNet":
        from catome_export.runtime.unet import RuntimeUNet

        return RuntimeUNet
    if name in ("VerifyReport", "verify_engine"):
        from catome_export.runtime import verify

        return getattr(verify, name)
    raise AttributeError(f"module 'catome_export.runtime' has no attribute {name!r}")
