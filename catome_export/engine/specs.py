"""The stage specs of an engine folder: each stage's IO (name, dtype, partly symbolic shape) and the stages a
cached feature-cache call runs.

Symbolic dims are strings (``B``, ``H``, ``W``, ``H{d}``/``W{d}``, ``L``, ``N{k}``, ``K{k}``, ``R{k}``; see
:mod:`catome_export.export.stages`), static dims ints. Written into the manifest by the build, read back by
every load; nothing here needs the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from catome_export.dtypes import ELEMENT_TYPES
from catome_export.errors import CatomeError

TORCH_DTYPES = ELEMENT_TYPES
DTYPE_NAMES = {v: k for k, v in ELEMENT_TYPES.items()}
DOWNSAMPLES = (2, 4, 8, 16, 32)
"""Downsample factors that get their own ``H{d}``/``W{d}`` dim names."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and (partly symbolic) shape of one graph input or output."""

    name: str
    dtype: str
    """``float32``, ``float16`` or ``int64``."""
    shape: tuple[str | int, ...]
    """Symbolic dims as strings (see the module docstring), static dims as ints."""

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise CatomeError(f"tensor {self.name}: unknown dtype {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def dynamic_axes(self) -> dict[int, str]:
        """Axis index -> symbolic dim name (for ``torch.onnx.export``)."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(name=str(d["name"]), dtype=str(d["dtype"]),
                   shape=tuple(x if isinstance(x, str) else int(x) for x in d["shape"]))


@dataclass(frozen=True)
class StageSpec:
    """One stage: which site's block it runs, which site's input it returns, and its IO."""

    index: int
    site: int | None
    """Merge site whose block runs inside this stage (its five plan tensors are inputs); None for stage 0."""
    next_site: int | None
    """Site whose block input this stage returns as ``x{next_site}``; None for the last stage."""
    inputs: tuple[TensorSpec, ...]
    """forward() takes them positionally in this order."""
    outputs: tuple[TensorSpec, ...]
    """forward() returns a tuple in this order."""

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "site": self.site, "next_site": self.next_site,
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StageSpec":
        return cls(index=int(d["index"]), site=None if d.get("site") is None else int(d["site"]),
                   next_site=None if d.get("next_site") is None else int(d["next_site"]),
                   inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]))


@dataclass(frozen=True)
class CachedBranch:
    """What a cached call of one feature-cache branch runs: the stages of the shallow branch, and the tensors
    kept from the last full call that they read."""

    branch: int
    stages: tuple[int, ...]
    """Indices of the stages a cached call runs (the others are skipped)."""
    cached: tuple[str, ...]
    """Names of the tensors a cached call reads from the last full call."""

    def to_dict(self) -> dict[str, Any]:
        return {"branch": self.branch, "stages": list(self.stages), "cached": list(self.cached)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CachedBranch":
        return cls(branch=int(d["branch"]), stages=tuple(int(i) for i in d["stages"]),
                   cached=tuple(str(n) for n in d["cached"]))
