"""pybind11-style enums of the TensorRT bindings, for the major version being played."""

from __future__ import annotations

from typing import Any

from . import _tables
from ._version import MAJOR


class EnumBase:
    """Like a pybind11 enum member: ``.name``, ``.value``, ``int()``, ``Type.__members__``, hashable."""

    __members__: dict[str, "EnumBase"] = {}
    __slots__ = ("name", "value")

    def __init__(self, name: str, value: int) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "value", value)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} members are read-only")

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.value == self.value  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.value))

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self.name}: {self.value}>"

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


def make_enum(name: str, members: dict[str, int]) -> type:
    cls = type(name, (EnumBase,), {"__slots__": ()})
    by_value: dict[int, EnumBase] = {}
    table: dict[str, EnumBase] = {}
    for member, value in members.items():
        item = by_value.get(value) or cls(member, value)  # aliases (e.g. WEIGHTLESS = STRIP_PLAN) share one member
        by_value.setdefault(value, item)
        table[member] = item
        setattr(cls, member, item)
    cls.__members__ = table
    return cls


_ENUMS = _tables.ENUMS_10 if MAJOR == 10 else _tables.ENUMS_11
_LAYERS = _tables.LAYER_TYPES_10 if MAJOR == 10 else _tables.LAYER_TYPES_11

ExecutionContextAllocationStrategy = make_enum("ExecutionContextAllocationStrategy",
                                               _ENUMS["ExecutionContextAllocationStrategy"])
SerializationFlag = make_enum("SerializationFlag", _ENUMS["SerializationFlag"])
EngineCapability = make_enum("EngineCapability", _ENUMS["EngineCapability"])
TensorLocation = make_enum("TensorLocation", _ENUMS["TensorLocation"])
TensorIOMode = make_enum("TensorIOMode", _ENUMS["TensorIOMode"])
BuilderFlag = make_enum("BuilderFlag", _ENUMS["BuilderFlag"])
MemoryPoolType = make_enum("MemoryPoolType", _ENUMS["MemoryPoolType"])
PreviewFeature = make_enum("PreviewFeature", _ENUMS["PreviewFeature"])
HardwareCompatibilityLevel = make_enum("HardwareCompatibilityLevel", _ENUMS["HardwareCompatibilityLevel"])
RuntimePlatform = make_enum("RuntimePlatform", _ENUMS["RuntimePlatform"])
DeviceType = make_enum("DeviceType", _ENUMS["DeviceType"])
ProfilingVerbosity = make_enum("ProfilingVerbosity", _ENUMS["ProfilingVerbosity"])
TacticSource = make_enum("TacticSource", _ENUMS["TacticSource"])
TilingOptimizationLevel = make_enum("TilingOptimizationLevel", _ENUMS["TilingOptimizationLevel"])
NetworkDefinitionCreationFlag = make_enum("NetworkDefinitionCreationFlag", _ENUMS["NetworkDefinitionCreationFlag"])
DataType = make_enum("DataType", _ENUMS["DataType"])
TensorFormat = make_enum("TensorFormat", _ENUMS["TensorFormat"])
OnnxParserFlag = make_enum("OnnxParserFlag", _ENUMS["OnnxParserFlag"])
LayerType = make_enum("LayerType", {n: i for i, n in enumerate(_LAYERS)})
OptProfileSelector = make_enum("OptProfileSelector", {"MIN": 0, "OPT": 1, "MAX": 2})
ErrorCode = make_enum("ErrorCode", {
    "SUCCESS": 0, "INTERNAL_ERROR": 1, "MEM_ALLOC_FAILED": 2, "MODEL_DESERIALIZE_FAILED": 3, "INVALID_VALUE": 4,
    "INVALID_GRAPH": 5, "INVALID_NODE": 6, "UNSUPPORTED_GRAPH": 7, "UNSUPPORTED_NODE": 8,
    "UNSUPPORTED_NODE_ATTR": 9, "UNSUPPORTED_NODE_INPUT": 10, "UNSUPPORTED_NODE_DATATYPE": 11,
    "UNSUPPORTED_NODE_DYNAMIC": 12, "UNSUPPORTED_NODE_SHAPE": 13, "REFIT_FAILED": 14,
})
QuantizationFlag = make_enum("QuantizationFlag", _ENUMS["QuantizationFlag"]) if "QuantizationFlag" in _ENUMS else None

_ITEMSIZE = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT8": 1, "INT32": 4, "INT64": 8, "BOOL": 1, "UINT8": 1, "FP8": 1,
             "INT4": 0.5, "FP4": 0.5, "E8M0": 1}
DataType.itemsize = property(lambda self: _ITEMSIZE.get(self.name))  # type: ignore[attr-defined]


class Dims(tuple):
    """``trt.Dims``: a shape; ``-1`` marks a dimension not known until runtime."""

    def __new__(cls, shape: Any = ()) -> "Dims":
        return super().__new__(cls, (int(d) for d in shape))

    def __repr__(self) -> str:
        return "(" + ", ".join(str(d) for d in self) + ("," if len(self) == 1 else "") + ")"

    __str__ = __repr__
