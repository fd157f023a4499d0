"""Pieces shared by the builder and the runtime halves: loggers, host memory, the plugin registry."""

from __future__ import annotations

import sys
from typing import Any

from ._enums import DataType, make_enum

Severity = make_enum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})


class ILogger:
    """``trt.ILogger``: subclass it and implement ``log(severity, msg)``."""

    Severity = Severity

    def __init__(self) -> None:
        pass

    def log(self, severity: Any, msg: str) -> None:  # pragma: no cover - abstract in TensorRT
        raise NotImplementedError


for _name, _member in Severity.__members__.items():
    setattr(ILogger, _name, _member)


class Logger(ILogger):
    """``trt.Logger(min_severity=Logger.WARNING)``: prints messages at or above ``min_severity`` to stderr."""

    def __init__(self, min_severity: Any = Severity.WARNING) -> None:
        super().__init__()
        self.min_severity = min_severity

    def log(self, severity: Any, msg: str) -> None:
        if int(severity) <= int(self.min_severity):
            print(f"[TRT] [{severity.name[0]}] {msg}", file=sys.stderr)


def log(logger: Any, severity: Any, msg: str) -> None:
    """Report through the user's logger as TensorRT does (``logger.log`` must not raise)."""
    if logger is not None:
        try:
            logger.log(severity, msg)
        except Exception:  # TensorRT's log() is noexcept
            pass


def api_error(logger: Any, where: str, msg: str) -> None:
    log(logger, Severity.ERROR, f"{where}: Error Code 3: API Usage Error ({msg})")


class IHostMemory(bytes):
    """``trt.IHostMemory``: a host buffer (buffer protocol), ``nbytes``, ``dtype``; ``with`` is a deprecated no-op."""

    @property
    def nbytes(self) -> int:
        return len(self)

    @property
    def dtype(self) -> Any:
        return DataType.UINT8

    def __enter__(self) -> "IHostMemory":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def as_buffer(data: Any, what: str) -> bytes:
    """Bytes of a Python buffer, as pybind11's ``py::buffer`` accepts (TypeError for anything else)."""
    try:
        return bytes(memoryview(data))
    except TypeError:
        raise TypeError(f"{what}(): incompatible function arguments; expected a buffer, got "
                        f"{type(data).__name__}") from None


class IPluginCreator:
    def __init__(self, name: str, version: str, namespace: str = "") -> None:
        self.name = name
        self.plugin_version = version
        self.plugin_namespace = namespace

    def __repr__(self) -> str:
        return f"<IPluginCreator {self.name} v{self.plugin_version}>"


class IPluginRegistry:
    """``trt.IPluginRegistry``: the creators registered so far (``init_libnvinfer_plugins`` adds NVIDIA's)."""

    def __init__(self) -> None:
        self._creators: list[IPluginCreator] = []

    @property
    def all_creators(self) -> list[IPluginCreator]:
        return list(self._creators)

    @property
    def plugin_creator_list(self) -> list[IPluginCreator]:
        return list(self._creators)

    def get_creator(self, type: str, version: str, plugin_namespace: str = "") -> IPluginCreator | None:
        for c in self._creators:
            if c.name == type and c.plugin_version == version and c.plugin_namespace == plugin_namespace:
                return c
        return None

    def has(self, name: str, namespace: str = "") -> bool:
        return any(c.name == name and c.plugin_namespace == namespace for c in self._creators)

    def _add(self, creator: IPluginCreator) -> None:
        if self.get_creator(creator.name, creator.plugin_version, creator.plugin_namespace) is None:
            self._creators.append(creator)



_REGISTRY = IPluginRegistry()

# Plugins of libnvinfer_plugin that the ONNX parser maps ops onto (plugin/README.md of NVIDIA/TensorRT).
NVINFER_PLUGINS = (("ScatterElements", "1"), ("ScatterElements", "2"), ("InstanceNormalization_TRT", "1"),
                   ("InstanceNormalization_TRT", "2"), ("InstanceNormalization_TRT", "3"))


def get_plugin_registry() -> IPluginRegistry:
    """``trt.get_plugin_registry()``: the process-wide registry."""
    return _REGISTRY


def init_libnvinfer_plugins(logger: Any, namespace: str) -> bool:
    """``trt.init_libnvinfer_plugins(logger, namespace)``: register NVIDIA's plugins under ``namespace``."""
    for name, version in NVINFER_PLUGINS:
        _REGISTRY._add(IPluginCreator(name, version, namespace))
    log(logger, Severity.VERBOSE, f"Registered plugin creators of libnvinfer_plugin in namespace {namespace!r}")
    return True
