"""The runtime half of the stand-in: Runtime, ICudaEngine, IExecutionContext.

Follows ``python/src/infer/pyCore.cpp`` of NVIDIA/TensorRT and the contracts
of ``include/NvInferRuntime.h``:

- ``Runtime.deserialize_cuda_engine`` returns None for a plan built by any
  other exact TensorRT version (or a damaged one, or one needing plugins
  that are not registered), logging why through the runtime's logger.
- ``IExecutionContext.set_tensor_address`` returns False for an unknown name
  or an address that is not 256-byte aligned; 0 resets the address to its
  default (null), as ``setTensorAddress`` documents.
- ``set_input_shape`` returns False for a shape of the wrong rank, one that
  contradicts a fixed dimension, or one outside the active profile.
- ``get_tensor_shape`` of an output has -1 for runtime dimensions until every
  input shape is set; outputs are then resolved from the ONNX dimension
  names and expressions the parser recorded (-1 where they cannot be).
- ``set_device_memory(ptr, size)`` needs a 256-byte aligned address (null
  only when ``device_memory_size_v2`` is 0). ``device_memory_size_v2`` and
  ``get_device_memory_size_for_profile_v2`` are upper bounds (the header's
  words): the size must cover what the current input shapes need
  (``update_device_memory_size_for_shapes``), which enqueue checks.
- ``execute_async_v3(stream_handle)`` returns False (nothing runs) unless
  every input shape is set, named dimensions agree, every I/O tensor has a
  non-null address (zero-volume tensors included), and, for a context made
  with ``ExecutionContextAllocationStrategy.USER_MANAGED``, device memory is
  set and large enough for the current shapes. It also refuses the legacy default stream (handle 0, or
  ``cudaStreamLegacy``, handle 1 in ``cuda_runtime_api.h``): TensorRT accepts
  it but warns it adds device-wide synchronisations; the stand-in makes that
  an error on purpose so code under test must use a stream it owns.

No kernels run. Each accepted enqueue is appended to :data:`ENQUEUES` (stream,
shapes and addresses) so tests can check what reached TensorRT.
"""

from __future__ import annotations

import ast
import operator
from typing import Any

from . import _formats
from ._core import IHostMemory, Severity, api_error, as_buffer, get_plugin_registry, log
from ._enums import (
    DataType, Dims, EngineCapability, ExecutionContextAllocationStrategy, TensorFormat, TensorIOMode, TensorLocation,
)
from ._version import DEVICE, MAJOR, VERSION

ALIGNMENT = 256

ENQUEUES: list[dict[str, Any]] = []
"""Every enqueue the stand-in accepted: ``{"context", "stream", "shapes", "addresses"}``."""


class Runtime:
    """``trt.Runtime(logger)``: deserialises plans."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.DLA_core = -1
        self.num_DLA_cores = 0
        self.error_recorder = None
        self.gpu_allocator = None
        self.max_threads = 1
        self.engine_host_code_allowed = False
        self.temporary_directory = ""
        self.tempfile_control_flags = 3

    def get_plugin_registry(self) -> Any:
        return get_plugin_registry()

    def deserialize_cuda_engine(self, serialized_engine: Any) -> "ICudaEngine | None":
        raw = as_buffer(serialized_engine, "deserialize_cuda_engine")
        plan = _formats.decode_plan(raw)
        where = "IRuntime::deserializeCudaEngine"
        if plan is None:
            log(self.logger, Severity.ERROR, f"{where}: Error Code 1: Serialization (Serialization assertion "
                "magicTagRead == kMAGIC_TAG failed.Magic tag does not match)")
            return None
        built = str(plan.get("version"))
        if built != VERSION and not self._version_compatible(plan):
            log(self.logger, Severity.ERROR, f"{where}: Error Code 6: API Usage Error (The engine plan file is not "
                f"compatible with this version of TensorRT, expecting library version {VERSION} got {built}, "
                "please rebuild.)")
            return None
        if plan.get("device") != DEVICE and plan.get("hardware_compatibility_level", "NONE") == "NONE":
            log(self.logger, Severity.ERROR, f"{where}: Error Code 6: the engine was built for {plan.get('device')} "
                f"and this device is {DEVICE}")
            return None
        registry = get_plugin_registry()
        for plugin in plan.get("plugins", []):
            if not registry.has(plugin):
                log(self.logger, Severity.ERROR, f"{where}: Error Code 1: Serialization (getPluginCreator could not "
                    f"find plugin {plugin}: call init_libnvinfer_plugins before deserialising)")
                return None
        return ICudaEngine(plan, raw, self.logger)

    def _version_compatible(self, plan: dict[str, Any]) -> bool:
        if not plan.get("version_compatible") or not self.engine_host_code_allowed:
            return False
        built = [int(p) for p in str(plan.get("version")).split(".")[:3]]
        here = [int(p) for p in VERSION.split(".")[:3]]
        return built[0] == here[0] and built <= here


class ICudaEngine:
    """``trt.ICudaEngine``: I/O tensors, profiles, device memory size, execution contexts."""

    def __init__(self, plan: dict[str, Any], raw: bytes, logger: Any) -> None:
        self._plan = plan
        self._raw = raw
        self._logger = logger
        self._io = {t["name"]: t for t in plan["io"]}
        self._order = [t["name"] for t in plan["io"]]
        self.name = plan.get("source", "")
        self.num_layers = int(plan.get("layers", 0))
        refit = plan.get("refit") or {}
        self.refittable = bool(refit.get("refittable", False))
        self._stripped = bool(refit.get("stripped", False))
        self._weights: dict[str, dict[str, Any]] = {n: dict(w) for n, w in (refit.get("weights") or {}).items()}
        """Refittable weights: name -> dtype, count, digest of the values it holds (None: none yet, stripped)."""
        self._refits = 0
        self.engine_capability = EngineCapability.STANDARD

    @property
    def num_io_tensors(self) -> int:
        return len(self._order)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._plan["profiles"])

    def get_tensor_name(self, index: int) -> str:
        if not 0 <= index < len(self._order):
            raise IndexError(index)
        return self._order[index]

    def __getitem__(self, index: int) -> str:
        if index < 0:
            index += len(self._order)
        return self.get_tensor_name(index)

    def get_tensor_mode(self, name: str) -> Any:
        t = self._io.get(name)
        return TensorIOMode.NONE if t is None else getattr(TensorIOMode, t["mode"])

    def get_tensor_dtype(self, name: str) -> Any:
        t = self._io.get(name)
        return DataType.FLOAT if t is None else getattr(DataType, t["dtype"])

    def get_tensor_shape(self, name: str) -> Dims:
        t = self._io.get(name)
        return Dims(()) if t is None else Dims(t["shape"])

    def get_tensor_location(self, name: str) -> Any:
        return TensorLocation.DEVICE

    def get_tensor_format(self, name: str, profile_index: int = 0) -> Any:
        return TensorFormat.LINEAR

    def get_tensor_bytes_per_component(self, name: str, profile_index: int = 0) -> int:
        t = self._io.get(name)
        return -1 if t is None else int(getattr(DataType, t["dtype"]).itemsize or 1)

    def get_tensor_components_per_element(self, name: str, profile_index: int = 0) -> int:
        return 1

    def is_shape_inference_io(self, name: str) -> bool:
        return False

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        """[min, opt, max] of input ``name`` in profile ``profile_index``."""
        t = self._io.get(name)
        if t is None or t["mode"] != "INPUT" or not 0 <= profile_index < self.num_optimization_profiles:
            raise RuntimeError(f"get_tensor_profile_shape: {name!r} is not an input of profile {profile_index}")
        return [Dims(s) for s in self._plan["profiles"][profile_index][name]]

    def get_tensor_format_desc(self, name: str, profile_index: int = 0) -> str:
        return "Row major linear FP32 format (kLINEAR)" if name in self._io else ""

    def get_tensor_vectorized_dim(self, name: str, profile_index: int = 0) -> int:
        return -1  # linear formats are not vectorized

    def _scratch_bytes(self, shapes: dict[str, Any]) -> int:
        """Scratch memory the stand-in's kernels need for input ``shapes`` (grows with their volume)."""
        total = 0
        for name, shape in shapes.items():
            itemsize = getattr(DataType, self._io[name]["dtype"]).itemsize or 1
            total += int(_volume(shape) * itemsize)
        return _align(4 * total + 4096)

    @property
    def device_memory_size_v2(self) -> int:
        """Upper bound of the scratch memory over every profile and shape."""
        return int(self._plan["device_memory_size"])

    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
        """Upper bound of the scratch memory over the shapes of one profile."""
        if not 0 <= profile_index < self.num_optimization_profiles:
            return 0
        profile = self._plan["profiles"][profile_index]
        return self._scratch_bytes({name: shapes[2] for name, shapes in profile.items() if name in self._io})

    # deprecated in 10.1, removed in 11
    @property
    def device_memory_size(self) -> int:
        return int(self._plan["device_memory_size"])

    def get_device_memory_size_for_profile(self, profile_index: int) -> int:
        return self.get_device_memory_size_for_profile_v2(profile_index)

    @property
    def has_implicit_batch_dimension(self) -> bool:
        return False

    def create_execution_context_without_device_memory(self) -> "IExecutionContext":
        return IExecutionContext(self, ExecutionContextAllocationStrategy.USER_MANAGED)

    def create_execution_context(self, strategy: Any = None) -> "IExecutionContext":
        strategy = ExecutionContextAllocationStrategy.STATIC if strategy is None else strategy
        if not isinstance(strategy, ExecutionContextAllocationStrategy):
            raise TypeError("create_execution_context(): incompatible function arguments")
        return IExecutionContext(self, strategy)

    def serialize(self) -> IHostMemory:
        if not self._refits:
            return IHostMemory(self._raw)
        plan = dict(self._plan)  # a refit engine serializes what it holds now (a stripped one still without weights)
        plan["refit"] = {**plan["refit"], "weights": {n: {**w, "digest": None if self._stripped else w["digest"]}
                                                      for n, w in self._weights.items()}}
        return IHostMemory(_formats.encode_plan(plan))

    def __enter__(self) -> "ICudaEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


if MAJOR >= 11:
    for _name in ("device_memory_size", "get_device_memory_size_for_profile", "has_implicit_batch_dimension",
                  "create_execution_context_without_device_memory"):
        delattr(ICudaEngine, _name)


def _volume(shape: Any) -> int:
    v = 1
    for d in shape:
        v *= max(int(d), 0)
    return v


def _align(n: int, to: int = ALIGNMENT) -> int:
    return (int(n) + to - 1) // to * to


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Div: operator.floordiv, ast.Mod: operator.mod}


def _eval_dim(expr: Any, env: dict[str, int]) -> int:
    """A dimension from an int, a dimension name or an arithmetic expression of names; -1 when unknown."""
    if isinstance(expr, int):
        return expr
    if not isinstance(expr, str) or expr == "?":
        return -1

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in env:
                raise KeyError(node.id)
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(expr)

    try:
        return int(ev(ast.parse(expr, mode="eval")))
    except (KeyError, ValueError, SyntaxError, ZeroDivisionError):
        return -1


class IExecutionContext:
    """``trt.IExecutionContext``: shapes, addresses, device memory, profile, ``execute_async_v3``."""

    def __init__(self, engine: ICudaEngine, strategy: Any) -> None:
        self.engine = engine
        self.name = ""
        self.debug_sync = False
        self.profiler = None
        self.error_recorder = None
        self.enqueue_emits_profile = True
        self.persistent_cache_limit = 0
        self._strategy = strategy
        self._profile = 0
        self._shapes: dict[str, Dims] = {}
        self._addresses: dict[str, int] = {}
        self._memory: tuple[int, int] | None = None
        self._logger = engine._logger

    # -- profiles and shapes
    @property
    def active_optimization_profile(self) -> int:
        return self._profile

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            api_error(self._logger, "IExecutionContext::setOptimizationProfileAsync",
                      f"profile index {profile_index} out of range")
            return False
        if profile_index != self._profile:
            self._shapes.clear()  # shapes must be set again after switching (setOptimizationProfileAsync docs)
        self._profile = profile_index
        return True

    def _inputs(self) -> list[dict[str, Any]]:
        return [t for t in self.engine._plan["io"] if t["mode"] == "INPUT"]

    def set_input_shape(self, name: str, shape: Any) -> bool:
        t = self.engine._io.get(name)
        where = "IExecutionContext::setInputShape"
        if t is None or t["mode"] != "INPUT":
            api_error(self._logger, where, f"{name!r} is not an input tensor")
            return False
        dims = Dims(shape)
        if len(dims) != len(t["shape"]):
            api_error(self._logger, where, f"{name}: rank {len(dims)} given, the engine has {len(t['shape'])}")
            return False
        lo, _, hi = self.engine._plan["profiles"][self._profile][name]
        for axis, (d, fixed, mn, mx) in enumerate(zip(dims, t["shape"], lo, hi)):
            if fixed >= 0 and d != fixed:
                api_error(self._logger, where, f"{name}: dimension {axis} is {d}, the engine fixes it to {fixed}")
                return False
            if not mn <= d <= mx:
                api_error(self._logger, where, f"{name}: dimension {axis} = {d} is outside the range [{mn}, {mx}] "
                          f"of optimization profile {self._profile}")
                return False
        self._shapes[name] = dims
        return True

    def _resolved(self, t: dict[str, Any]) -> Dims:
        if t["mode"] == "INPUT":
            if t["name"] in self._shapes:
                return self._shapes[t["name"]]
            lo, _, hi = self.engine._plan["profiles"][self._profile][t["name"]]
            return Dims(d if d >= 0 else (a if a == b else -1) for d, a, b in zip(t["shape"], lo, hi))
        if not self.all_binding_shapes_specified:
            return Dims(t["shape"])
        env = self._named_dims()
        exprs = t.get("dim_exprs") or t["shape"]
        return Dims(d if d >= 0 else _eval_dim(e, env) for d, e in zip(t["shape"], exprs))

    def _named_dims(self) -> dict[str, int]:
        env: dict[str, int] = {}
        for t in self._inputs():
            for name, value in zip(t["dim_names"], self._shapes.get(t["name"], ())):
                if name:
                    env.setdefault(name, value)
        return env

    def _named_conflicts(self) -> list[str]:
        seen: dict[str, tuple[int, str]] = {}
        problems = []
        for t in self._inputs():
            for name, value in zip(t["dim_names"], self._shapes.get(t["name"], ())):
                if not name:
                    continue
                if name in seen and seen[name][0] != value:
                    problems.append(f"dimension {name!r} is {seen[name][0]} in {seen[name][1]} and {value} in "
                                    f"{t['name']}")
                seen.setdefault(name, (value, t["name"]))
        return problems

    def get_tensor_shape(self, name: str) -> Dims:
        t = self.engine._io.get(name)
        return Dims(()) if t is None else self._resolved(t)

    @property
    def all_binding_shapes_specified(self) -> bool:
        return all(t["name"] in self._shapes or all(d >= 0 for d in t["shape"]) for t in self._inputs())

    @property
    def all_shape_inputs_specified(self) -> bool:  # removed in 11
        return True

    def infer_shapes(self) -> list[str]:
        return [t["name"] for t in self._inputs() if t["name"] not in self._shapes and any(d < 0 for d in t["shape"])]

    # -- addresses and memory
    def set_tensor_address(self, name: str, memory: int) -> bool:
        where = "IExecutionContext::setTensorAddress"
        if name not in self.engine._io:
            api_error(self._logger, where, f"{name!r} is not an input or output tensor")
            return False
        memory = int(memory)
        if memory == 0:
            self._addresses.pop(name, None)  # "Pass data=nullptr to reset to the default state."
            return True
        if memory % ALIGNMENT:
            api_error(self._logger, where, f"the address {memory:#x} of {name} is not {ALIGNMENT}-byte aligned")
            return False
        self._addresses[name] = memory
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def set_device_memory(self, memory: int, size: int) -> None:
        """``setDeviceMemoryV2``: aligned memory (null only when ``device_memory_size_v2`` is 0) of ``size`` bytes,
        which must be large enough for the input shapes it runs with (enqueue checks; the engine's sizes are upper
        bounds). Errors are logged and leave the context without memory, as TensorRT does."""
        where = "IExecutionContext::setDeviceMemoryV2"
        memory, size, reported = int(memory), int(size), self.engine.device_memory_size_v2
        if self._strategy != ExecutionContextAllocationStrategy.USER_MANAGED:
            api_error(self._logger, where, "the context was not created with USER_MANAGED allocation")
            return
        if memory == 0 and reported > 0:
            api_error(self._logger, where, f"null memory, but the engine reports {reported} bytes")
            self._memory = None
            return
        if memory % ALIGNMENT:
            api_error(self._logger, where, f"the address {memory:#x} is not {ALIGNMENT}-byte aligned")
            self._memory = None
            return
        if size < 0:
            api_error(self._logger, where, f"negative size {size}")
            self._memory = None
            return
        self._memory = (memory, size)

    def _set_device_memory_v1(self, memory: int) -> None:
        self.set_device_memory(memory, self.engine.device_memory_size_v2)

    device_memory = property(None, _set_device_memory_v1)

    def update_device_memory_size_for_shapes(self) -> int:
        """Scratch bytes the current input shapes need (0, the error value, until every input shape is set)."""
        if self.infer_shapes():
            return 0
        return self.engine._scratch_bytes({t["name"]: self._resolved(t) for t in self._inputs()})

    # -- execution
    def _problems(self) -> list[str]:
        problems = [f"the shape of input {n} is not set" for n in self.infer_shapes()]
        problems += self._named_conflicts()
        lacking = [n for n, w in self.engine._weights.items() if w["digest"] is None]
        if lacking:
            problems.append(f"the engine was built weight-stripped and {len(lacking)} weights were never refit "
                            f"(e.g. {lacking[0]!r}; the stand-in refuses to run it)")
        for name in self.engine._order:
            if not self._addresses.get(name):
                problems.append(f"{name} has no address (every input and output needs a non-null address, "
                                "also when it holds no elements)")
        if self._strategy == ExecutionContextAllocationStrategy.USER_MANAGED and self.engine.device_memory_size_v2 > 0:
            needed = self.update_device_memory_size_for_shapes()
            if self._memory is None:
                problems.append("the context was created with USER_MANAGED allocation and no device memory was set")
            elif needed and self._memory[1] < needed:
                problems.append(f"the device memory set holds {self._memory[1]} bytes, the current input shapes "
                                f"need {needed}")
        return problems

    def execute_async_v3(self, stream_handle: int) -> bool:
        where = "IExecutionContext::enqueueV3"
        stream = int(stream_handle)
        problems = self._problems()
        if stream in (0, 1):
            problems.append(f"stream handle {stream} is the legacy default stream (0, or cudaStreamLegacy = 1; the "
                            "stand-in refuses it; TensorRT warns it adds device-wide synchronisations)")
        if problems:
            api_error(self._logger, where, "; ".join(problems))
            return False
        ENQUEUES.append({"context": id(self), "stream": stream,
                         "shapes": {n: tuple(self.get_tensor_shape(n)) for n in self.engine._order},
                         "addresses": {n: self._addresses[n] for n in self.engine._order}})
        return True

    def execute_v2(self, bindings: list[int]) -> bool:
        if len(bindings) != self.engine.num_io_tensors:
            api_error(self._logger, "IExecutionContext::executeV2", "one binding per I/O tensor is needed")
            return False
        for name, address in zip(self.engine._order, bindings):
            if not self.set_tensor_address(name, address):
                return False
        problems = self._problems()
        if problems:
            api_error(self._logger, "IExecutionContext::executeV2", "; ".join(problems))
            return False
        return True

    def __enter__(self) -> "IExecutionContext":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


if MAJOR >= 11:
    delattr(IExecutionContext, "all_shape_inputs_specified")
