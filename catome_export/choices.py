"""Closed sets of values: build backends, precisions, weights, exporters, merge modes.

Each is a str-valued enum: a member equals its string (``Precision.FP16 ==
"fp16"``), prints and formats as it (``f"{Precision.FP16}"`` is ``fp16``) and
is written to JSON as it, so the CLI's strings and the manifest stay the same.
``parse`` turns user input into a member, or a CatomeError naming the field
and the valid values. This module imports nothing heavy.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from catome_export.errors import CatomeError

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """A str-valued enum whose members read, print and serialise as their value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The valid strings, in declaration order (for argparse ``choices`` and error messages)."""
        return tuple(str(m.value) for m in cls)

    @classmethod
    def parse(cls: type[C], value: object, field: str) -> C:
        """The member for ``value`` (a member or its string), or CatomeError naming ``field`` and the valid values."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            for member in cls:
                if member.value == value:
                    return member
        raise CatomeError(f"{field} must be one of {', '.join(cls.values())}, got {value!r}")


class Precision(Choice):
    """Float precision of the exported graphs and engines."""

    FP32 = "fp32"
    FP16 = "fp16"


class BuildBackend(Choice):
    """Engines a build makes: ``auto`` (TensorRT where it runs, else ONNX Runtime), ``ort`` or ``trt``."""

    AUTO = "auto"
    ORT = "ort"
    TRT = "trt"


class EngineBackend(Choice):
    """What an engine folder holds: ONNX graphs only (``ort``) or TensorRT plans too (``trt``)."""

    ORT = "ort"
    TRT = "trt"


class Weights(Choice):
    """Where a model's weights come from."""

    PRETRAINED = "pretrained"
    RANDOM = "random"


class Exporter(Choice):
    """The ``torch.onnx`` exporter."""

    TORCHSCRIPT = "torchscript"
    DYNAMO = "dynamo"


class MergeMode(Choice):
    """How the merge count r is chosen (exactly one of MergeSettings' threshold, ratio, merge_fraction)."""

    THRESHOLD = "threshold"
    RATIO = "ratio"
    FRACTION = "fraction"
