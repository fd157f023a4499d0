"""Refitting: ``trt.Weights``, ``trt.WeightsRole``, ``trt.Refitter`` and ``trt.OnnxParserRefitter``.

Names and signatures follow NVIDIA's bindings (``python/src/infer/pyCore.cpp``
``py::class_<IRefitter>``, ``pyFoundationalTypes.cpp`` ``Weights`` and
``WeightsRole``, ``python/src/parsers/pyOnnx.cpp`` ``OnnxParserRefitter``; the
docstrings of ``pyCoreDoc.h`` / ``pyOnnxDoc.h`` for the preconditions), 10.x
and 11.x; 10.x keeps the deprecated dynamic-range methods, which 11 removed.

What the stand-in models (the documented behaviour, no kernels):

- a plan built with ``BuilderFlag.REFIT`` (or ``REFIT_IDENTICAL``) is
  refittable; its refittable weights are the float initializers of the ONNX
  graph, named after them, each with its data type and element count (the
  weights prototype) and a digest of its values. ``STRIP_PLAN`` leaves the
  digests out of the plan: such an engine holds no weights until refit, and
  ``get_missing_weights`` lists every one of them. The stand-in's execution
  context refuses to enqueue an engine that still misses weights (TensorRT
  would compute garbage; the stand-in makes it an error so code under test
  must refit first);
- ``Refitter(engine, logger)`` on an engine that is not refittable logs an
  error and fails as pybind11 does for a factory returning null (TypeError);
- ``set_named_weights`` rejects (False, error logged) an unknown name, or
  weights whose dtype or count differ from the prototype;
- ``refit_cuda_engine`` returns False (error logged, nothing changed) while
  ``get_missing_weights()`` is not empty, else applies every weight set, which
  stay set for later refits; a refit engine serializes with the new digests
  (a stripped one without them, as it was built).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._core import Severity, api_error, log
from ._enums import DataType, TensorLocation, make_enum
from ._version import MAJOR

WeightsRole = make_enum("WeightsRole", {"KERNEL": 0, "BIAS": 1, "SHIFT": 2, "SCALE": 3, "CONSTANT": 4, "ANY": 5})

_NP_OF = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
          "BOOL": np.bool_, "UINT8": np.uint8}
_TRT_OF_NP = {np.dtype(v): k for k, v in _NP_OF.items()}
REFITTABLE_ONNX_TYPES = {1: "FLOAT", 10: "HALF", 16: "BF16"}
"""ONNX data types of initializers that become refittable weights (FLOAT, FLOAT16, BFLOAT16)."""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class Weights:
    """``trt.Weights``: ``Weights(type=DataType.FLOAT)`` (empty), ``Weights(type, ptr, count)`` or ``Weights(a)`` from
    a contiguous numpy array (kept, not copied); ``dtype``, ``size``, ``nbytes``, ``numpy()``, ``len()``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._array: np.ndarray | None = None
        if args and isinstance(args[0], np.ndarray) or "a" in kwargs:
            a = kwargs.get("a", args[0] if args else None)
            if not a.flags["C_CONTIGUOUS"]:
                raise TypeError("Weights(): the numpy array must be contiguous")
            name = _TRT_OF_NP.get(a.dtype)
            if name is None:
                raise TypeError(f"Weights(): unsupported numpy dtype {a.dtype}")
            self.dtype = getattr(DataType, name)
            self._array = a
            self.size = int(a.size)
        elif len(args) + len(kwargs) >= 3 or "ptr" in kwargs:
            self.dtype = kwargs.get("type", args[0] if args else None)
            self.size = int(kwargs.get("count", args[2] if len(args) > 2 else 0))
            self._ptr = int(kwargs.get("ptr", args[1] if len(args) > 1 else 0))
        else:
            self.dtype = kwargs.get("type", args[0] if args else DataType.FLOAT)
            self.size = 0
        if not isinstance(self.dtype, DataType):
            raise TypeError("Weights(): incompatible constructor arguments")

    @property
    def nbytes(self) -> int:
        return int(self.dtype.itemsize or 1) * self.size

    def numpy(self) -> np.ndarray:
        if self._array is not None:
            return self._array
        return np.zeros((0,), dtype=_NP_OF.get(self.dtype.name, np.float32))

    def __len__(self) -> int:
        return self.size

    def _data(self) -> bytes | None:
        """The values' bytes (None for weights given by address: the stand-in cannot read device pointers)."""
        return None if self._array is None else self._array.tobytes()


def as_weights(value: Any, where: str) -> Weights:
    """pybind11's implicit conversion of a numpy array to ``Weights``."""
    if isinstance(value, Weights):
        return value
    if isinstance(value, np.ndarray):
        return Weights(np.ascontiguousarray(value))
    raise TypeError(f"{where}(): incompatible function arguments; weights must be trt.Weights or a numpy array")


def onnx_weights(proto: Any, folder: Path | None) -> dict[str, dict[str, Any]]:
    """The refittable weights of an ONNX model: float initializers -> dtype name, count, digest (None where an
    external file cannot be read)."""
    from onnx import numpy_helper

    out: dict[str, dict[str, Any]] = {}
    for init in proto.graph.initializer:
        dtype = REFITTABLE_ONNX_TYPES.get(init.data_type)
        if dtype is None:
            continue
        count = 1
        for d in init.dims:
            count *= int(d)
        try:
            data = numpy_helper.to_array(init, base_dir=str(folder) if folder else "").tobytes()
        except Exception:  # external data not found: TensorRT's parser reports that separately
            data = None
        out[init.name] = {"dtype": dtype, "count": count, "digest": None if data is None else digest(data)}
    return out


class Refitter:
    """``trt.Refitter(engine, logger)``: replaces the weights of a refittable :class:`ICudaEngine`."""

    def __init__(self, engine: Any, logger: Any) -> None:
        from ._runtime import ICudaEngine

        if not isinstance(engine, ICudaEngine):
            raise TypeError("__init__(): incompatible constructor arguments; engine must be a tensorrt.ICudaEngine")
        if not engine.refittable:
            api_error(logger, "IRefitter::createInferRefitter", "engine is not refittable (build it with "
                      "BuilderFlag.REFIT)")
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self._engine = engine
        self._logger = logger
        self._set: dict[str, tuple[Weights, Any]] = {}
        self.error_recorder = None
        self.max_threads = 1
        self.weights_validation = True

    @property
    def logger(self) -> Any:
        return self._logger

    # -- weights by name ------------------------------------------------------------------------
    def get_all_weights(self) -> list[str]:
        return list(self._engine._weights)

    def get_all(self) -> tuple[list[str], list[Any]]:
        names = self.get_all_weights()
        return names, [WeightsRole.CONSTANT] * len(names)

    def get_missing_weights(self) -> list[str]:
        """Weights the engine lacks (a stripped engine before its first refit) that have not been set."""
        return [n for n, w in self._engine._weights.items() if w["digest"] is None and n not in self._set]

    def get_missing(self) -> tuple[list[str], list[Any]]:
        names = self.get_missing_weights()
        return names, [WeightsRole.CONSTANT] * len(names)

    def get_weights_prototype(self, weights_name: str) -> Weights:
        w = self._engine._weights.get(weights_name)
        if w is None:
            proto = Weights(DataType.FLOAT)
            proto.size = -1
            return proto
        return Weights(getattr(DataType, w["dtype"]), 0, int(w["count"]))

    def set_named_weights(self, name: str, weights: Any, location: Any = None) -> bool:
        weights = as_weights(weights, "set_named_weights")
        where = "IRefitter::setNamedWeights"
        w = self._engine._weights.get(name) if name else None
        if w is None:
            api_error(self._logger, where, f"{name!r} does not correspond to any refittable weights")
            return False
        if weights.dtype.name != w["dtype"]:
            api_error(self._logger, where, f"weights {name!r} are {weights.dtype.name}, the prototype is {w['dtype']}")
            return False
        if weights.size != int(w["count"]):
            api_error(self._logger, where, f"weights {name!r} have {weights.size} elements, the prototype has "
                      f"{w['count']}")
            return False
        if location is not None and not isinstance(location, TensorLocation):
            raise TypeError("set_named_weights(): incompatible function arguments")
        self._set[name] = (weights, TensorLocation.HOST if location is None else location)
        return True

    def get_named_weights(self, weights_name: str) -> Weights:
        item = self._set.get(weights_name)
        if item is None:
            api_error(self._logger, "IRefitter::getNamedWeights", f"weights {weights_name!r} were never set")
            return Weights(DataType.FLOAT)
        return item[0]

    def get_weights_location(self, weights_name: str) -> Any:
        item = self._set.get(weights_name)
        if item is None:
            api_error(self._logger, "IRefitter::getWeightsLocation", f"weights {weights_name!r} were never set")
            return TensorLocation.HOST
        return item[1]

    def unset_named_weights(self, weights_name: str) -> bool:
        return self._set.pop(weights_name, None) is not None

    def set_weights(self, layer_name: str, role: Any, weights: Any) -> bool:
        """The layer-and-role form; the stand-in's layers are named after their weights."""
        if not isinstance(role, WeightsRole):
            raise TypeError("set_weights(): incompatible function arguments")
        return self.set_named_weights(layer_name, weights)

    # -- refit -----------------------------------------------------------------------------------
    def refit_cuda_engine(self) -> bool:
        missing = self.get_missing_weights()
        if missing:
            api_error(self._logger, "IRefitter::refitCudaEngine", f"{len(missing)} weights are missing, e.g. "
                      f"{missing[0]!r} (get_missing_weights())")
            return False
        for name, (weights, location) in self._set.items():
            data = weights._data()
            if data is None and location == TensorLocation.DEVICE:
                data = f"device:{id(weights)}".encode()
            if data is not None and self.weights_validation:
                values = weights.numpy()
                if values.dtype.kind == "f" and not np.isfinite(values).all():
                    api_error(self._logger, "IRefitter::refitCudaEngine", f"weights {name!r} hold NaN or Inf")
                    return False
            self._engine._weights[name]["digest"] = digest(data if data is not None else b"")
        self._engine._refits += 1
        log(self._logger, Severity.INFO, f"refit {len(self._set)} weights")
        return True

    def refit_cuda_engine_async(self, stream_handle: int) -> bool:
        return self.refit_cuda_engine()

    def __del__(self) -> None:
        pass


if MAJOR == 10:
    def _get_dynamic_range(self: Refitter, tensor_name: str) -> tuple[float, float]:
        return (0.0, 0.0)

    def _set_dynamic_range(self: Refitter, tensor_name: str, range: Any) -> bool:
        log(self._logger, Severity.WARNING, "set_dynamic_range is deprecated in TensorRT 10.1")
        return False

    def _tensors_with_dynamic_range(self: Refitter) -> list[str]:
        return []

    Refitter.get_dynamic_range = _get_dynamic_range  # type: ignore[attr-defined]
    Refitter.set_dynamic_range = _set_dynamic_range  # type: ignore[attr-defined]
    Refitter.get_tensors_with_dynamic_range = _tensors_with_dynamic_range  # type: ignore[attr-defined]


class OnnxErrors:
    """What ``OnnxParser`` and ``OnnxParserRefitter`` share in NVIDIA's bindings: the recorded errors
    (``num_errors``, ``get_error``, ``clear_errors``) and the reading of a model from a file or from bytes, a model
    that cannot be read being the error ``MODEL_DESERIALIZE_FAILED``."""

    _errors: list[Any]
    _logger: Any

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> Any:
        return self._errors[index] if 0 <= index < len(self._errors) else None

    def clear_errors(self) -> None:
        self._errors.clear()

    def _fail(self, code: Any, desc: str, node: int = -1, name: str = "", op: str = "") -> bool:
        from ._build import ParserError

        error = ParserError(code, desc, node, name, op)
        self._errors.append(error)
        log(self._logger, Severity.ERROR, str(error))
        return False

    def _read_file(self, model: str) -> tuple[Any, str] | None:
        """(the model, its path), or None with the error recorded."""
        import onnx

        from ._enums import ErrorCode

        path = os.fspath(model)
        try:
            return onnx.load(path, load_external_data=False), path
        except Exception as exc:
            self._fail(ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to parse ONNX model from file: {path} "
                       f"({type(exc).__name__})")
            return None

    def _read_bytes(self, model: Any, method: str) -> Any:
        """The model, or None with the error recorded."""
        import onnx

        from ._core import as_buffer
        from ._enums import ErrorCode

        try:
            return onnx.load_from_string(as_buffer(model, method))
        except Exception as exc:
            self._fail(ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to parse ONNX model ({type(exc).__name__})")
            return None


class OnnxParserRefitter(OnnxErrors):
    """``trt.OnnxParserRefitter(refitter, logger)``: sets a Refitter's weights from an ONNX model's initializers
    (``refit_from_file``, ``refit_from_bytes``); the caller then calls ``refitter.refit_cuda_engine()``."""

    def __init__(self, refitter: Refitter, logger: Any) -> None:
        if not isinstance(refitter, Refitter):
            raise TypeError("__init__(): incompatible constructor arguments")
        self._refitter = refitter
        self._logger = logger
        self._errors: list[Any] = []

    def refit_from_file(self, model: str) -> bool:
        read = self._read_file(model)
        return read is not None and self._refit(read[0], Path(read[1]).parent)

    def refit_from_bytes(self, model: Any, path: str | None = None) -> bool:
        proto = self._read_bytes(model, "refit_from_bytes")
        return proto is not None and self._refit(proto, Path(path).parent if path else None)

    def _refit(self, proto: Any, folder: Path | None) -> bool:
        from onnx import numpy_helper

        from ._enums import ErrorCode

        engine_weights = self._refitter._engine._weights
        inits = {i.name: i for i in proto.graph.initializer}
        for name in engine_weights:
            init = inits.get(name)
            if init is None:
                return self._fail(ErrorCode.REFIT_FAILED, f"the model has no initializer {name!r} the engine needs")
            try:
                array = np.ascontiguousarray(numpy_helper.to_array(init, base_dir=str(folder) if folder else ""))
            except Exception as exc:
                return self._fail(ErrorCode.REFIT_FAILED, f"cannot read initializer {name!r} ({type(exc).__name__})")
            if not self._refitter.set_named_weights(name, array):
                return self._fail(ErrorCode.REFIT_FAILED, f"the refitter rejected weights {name!r}")
        return True
