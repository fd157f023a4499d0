"""The backend interface: one small protocol that TensorRT, ONNX Runtime and eager torch implement.

A :class:`Backend` loads the stages of an engine folder once; each stage
becomes a :class:`StageRunner` that takes a ``name -> torch.Tensor`` dict of
its inputs (on the backend's device) and returns a ``name -> torch.Tensor``
dict of its outputs (on the same device). The runtime walks the chain of
runners and never sees a backend-specific type.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Protocol, runtime_checkable

import torch

from catome_export.errors import CatomeError

if TYPE_CHECKING:  # the export layer imports torch modules; keep this import for type checkers only
    from catome_export.export.stages import StageSpec, TensorSpec

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
"""Manifest dtype names -> torch dtypes."""


@runtime_checkable
class StageRunner(Protocol):
    """One loaded stage: runs its graph on torch tensors of the backend's device."""

    spec: "StageSpec"

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the stage on ``feeds`` (every name of ``spec.inputs``); returns every output of ``spec.outputs``."""
        ...

    def close(self) -> None:
        """Release what the stage holds (sessions, engines, contexts)."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A way to run stages: ``trt``, ``ort-cpu``, ``ort-cuda`` or ``torch``."""

    name: str
    device: torch.device

    def load_stage(self, engine_dir: Path, entry: dict, spec: "StageSpec") -> StageRunner:
        """Load stage ``spec.index`` of ``engine_dir``; ``entry`` is its item of the manifest's ``stages`` list."""
        ...

    def close(self) -> None:
        """Release every stage this backend loaded."""
        ...


def torch_dtype(spec: "TensorSpec") -> torch.dtype:
    """The torch dtype of a tensor spec, or CatomeError for a dtype the runtime does not know."""
    try:
        return TORCH_DTYPES[spec.dtype]
    except KeyError:
        raise CatomeError(
            f"tensor {spec.name!r} has dtype {spec.dtype!r}, which this version cannot run "
            f"(known: {', '.join(TORCH_DTYPES)}); rebuild the engine with this version of catome-export"
        ) from None


def ordered_feeds(spec: "StageSpec", feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The stage's inputs in ``spec.inputs`` order; CatomeError naming any missing input."""
    missing = [t.name for t in spec.inputs if t.name not in feeds]
    if missing:
        raise CatomeError(f"stage {spec.index} is missing inputs {missing}: the engine's stage chain is inconsistent; "
                          "rebuild it with catome-export build")
    return [feeds[t.name] for t in spec.inputs]


def check_outputs(spec: "StageSpec", outputs: Mapping[str, torch.Tensor]) -> None:
    """CatomeError when a stage did not return every output its spec lists."""
    missing = [t.name for t in spec.outputs if t.name not in outputs]
    if missing:
        raise CatomeError(f"stage {spec.index} did not return outputs {missing}: rebuild the engine")
