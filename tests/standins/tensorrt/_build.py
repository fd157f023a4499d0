"""The builder half of the stand-in: Builder, INetworkDefinition, OnnxParser, IBuilderConfig, profiles, timing caches.

Follows ``python/src/infer/pyCore.cpp``, ``pyGraph.cpp`` and
``python/src/parsers/pyOnnx.cpp`` of NVIDIA/TensorRT and the contracts
documented in ``include/NvInfer.h`` / ``NvInferRuntime.h``. The parser reads
the ONNX file for real (names, types and dims of the graph's inputs and
outputs, the ops and the plugins they need); the builder validates the
network against the optimisation profiles as TensorRT documents and returns
a plan (see ``_formats``) recording what was built.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from . import _formats
from ._refit import OnnxErrors, onnx_weights
from ._core import IHostMemory, Severity, api_error, as_buffer, get_plugin_registry, log
from ._enums import (
    BuilderFlag, DataType, DeviceType, Dims, EngineCapability, ErrorCode, HardwareCompatibilityLevel, LayerType,
    MemoryPoolType, NetworkDefinitionCreationFlag, OnnxParserFlag, PreviewFeature, ProfilingVerbosity, QuantizationFlag,
    RuntimePlatform, TacticSource, TensorLocation, TilingOptimizationLevel,
)
from ._version import DEVICE, MAJOR, VERSION

_MAX_DIMS = 8


def _check_enum(value: Any, enum: type, what: str) -> None:
    if not isinstance(value, enum):
        raise TypeError(f"{what}(): incompatible function arguments; expected {enum.__name__}, got "
                        f"{type(value).__name__}")


def _dims(shape: Any, what: str) -> Dims:
    try:
        dims = Dims(shape)
    except (TypeError, ValueError):
        raise TypeError(f"{what}(): incompatible function arguments; expected a shape, got {shape!r}") from None
    if len(dims) > _MAX_DIMS:
        raise ValueError("The number of input dims exceeds the maximum allowed number of dimensions")
    return dims


# -- timing cache ---------------------------------------------------------------------------------------------------

class ITimingCache:
    """``trt.ITimingCache``: tactic timings keyed by layer, stamped with the TensorRT version and device."""

    def __init__(self, version: str, device: str, entries: set[str]) -> None:
        self._version = version
        self._device = device
        self._entries = set(entries)

    def serialize(self) -> IHostMemory:
        return IHostMemory(_formats.encode_cache({"version": self._version, "device": self._device,
                                                  "entries": sorted(self._entries)}))

    def combine(self, input_cache: "ITimingCache", ignore_mismatch: bool) -> bool:
        """Append ``input_cache``'s entries; False (nothing combined) unless it comes from this exact TensorRT
        version, and from this device unless ``ignore_mismatch``."""
        if not isinstance(input_cache, ITimingCache):
            raise TypeError("combine(): incompatible function arguments; expected ITimingCache")
        if input_cache._version != self._version:
            return False
        if input_cache._device != self._device and not ignore_mismatch:
            return False
        self._entries |= input_cache._entries
        return True

    def reset(self) -> bool:
        self._entries.clear()
        return True


# -- network --------------------------------------------------------------------------------------------------------

class ITensor:
    """``trt.ITensor`` of a network: name, dtype, shape (-1 = dynamic), location, I/O role."""

    def __init__(self, name: str, dtype: Any, shape: Dims, dim_names: list[str | None]) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.location = TensorLocation.DEVICE
        self.is_shape_tensor = False
        self.is_execution_tensor = True
        self.is_network_input = False
        self.is_network_output = False
        self.allowed_formats = 1
        self._dim_names = list(dim_names)

    def get_dimension_name(self, index: int) -> str | None:
        return self._dim_names[index]

    def set_dimension_name(self, index: int, name: str) -> None:
        self._dim_names[index] = name

    def __repr__(self) -> str:
        return f"<ITensor {self.name} {self.dtype} {self.shape}>"


class ILayer:
    """``trt.ILayer``: name, type, metadata, inputs and outputs; in 10.x also the per-layer precision members
    (deprecated in 10.12), which 11.x removed from the bindings (``pyGraph.cpp``)."""

    def __init__(self, name: str, type: Any, op: str, num_inputs: int, num_outputs: int) -> None:
        self.name = name
        self._type = type
        self._num_inputs = num_inputs
        self._num_outputs = num_outputs
        self.metadata = op
        self._precision = DataType.FLOAT
        self._precision_is_set = False
        self._output_types: dict[int, Any] = {}

    @property
    def type(self) -> Any:
        return self._type

    @property
    def num_inputs(self) -> int:
        return self._num_inputs

    @property
    def num_outputs(self) -> int:
        return self._num_outputs

    def get_output_type(self, index: int) -> Any:
        return self._output_types.get(index, DataType.FLOAT)

    # deprecated in 10.12 ("Superseded by strong typing"), removed in 11
    @property
    def precision(self) -> Any:
        return self._precision

    @precision.setter
    def precision(self, dtype: Any) -> None:
        _check_enum(dtype, DataType, "precision")
        self._precision = dtype
        self._precision_is_set = True

    @property
    def precision_is_set(self) -> bool:
        return self._precision_is_set

    def reset_precision(self) -> None:
        self._precision = DataType.FLOAT
        self._precision_is_set = False

    def set_output_type(self, index: int, dtype: Any) -> None:
        _check_enum(dtype, DataType, "set_output_type")
        self._output_types[index] = dtype

    def output_type_is_set(self, index: int) -> bool:
        return index in self._output_types

    def reset_output_type(self, index: int) -> None:
        self._output_types.pop(index, None)


if MAJOR >= 11:
    for _name in ("precision", "precision_is_set", "reset_precision", "set_output_type", "output_type_is_set",
                  "reset_output_type"):
        delattr(ILayer, _name)


class INetworkDefinition:
    """``trt.INetworkDefinition``: inputs, outputs and layers; ``for layer in network`` iterates the layers."""

    def __init__(self, builder: "Builder", flags: int) -> None:
        self.builder = builder
        self.flags = flags
        self.name = "Unnamed Network 0"
        self.error_recorder = None
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []
        self._layers: list[ILayer] = []
        self._plugins: set[str] = set()
        self._output_dim_exprs: dict[str, list[str | int]] = {}
        self._source = ""
        self._weights: dict[str, dict[str, Any]] = {}
        """Refittable weights (float initializers of the parsed ONNX graph): name -> dtype, count, digest."""

    # flags
    def get_flag(self, flag: Any) -> bool:
        _check_enum(flag, NetworkDefinitionCreationFlag, "get_flag")
        if MAJOR >= 11 and flag.name == "STRONGLY_TYPED":
            return True  # "always enabled" in TensorRT 11
        return bool(self.flags & (1 << int(flag)))

    @property
    def strongly_typed(self) -> bool:
        return self.get_flag(NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    @property
    def has_implicit_batch_dimension(self) -> bool:
        return False

    # tensors
    def add_input(self, name: str, dtype: Any, shape: Any) -> ITensor:
        _check_enum(dtype, DataType, "add_input")
        dims = _dims(shape, "add_input")
        tensor = ITensor(name, dtype, dims, [None] * len(dims))
        tensor.is_network_input = True
        self._inputs.append(tensor)
        return tensor

    def mark_output(self, tensor: ITensor) -> None:
        if tensor not in self._outputs:
            tensor.is_network_output = True
            self._outputs.append(tensor)

    def unmark_output(self, tensor: ITensor) -> None:
        if tensor in self._outputs:
            tensor.is_network_output = False
            self._outputs.remove(tensor)

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def get_input(self, index: int) -> ITensor | None:
        return self._inputs[index] if 0 <= index < len(self._inputs) else None

    def get_output(self, index: int) -> ITensor | None:
        return self._outputs[index] if 0 <= index < len(self._outputs) else None

    def get_layer(self, index: int) -> ILayer | None:
        return self._layers[index] if 0 <= index < len(self._layers) else None

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, index: int) -> ILayer:
        if index < 0:
            index += len(self._layers)
        if not 0 <= index < len(self._layers):
            raise IndexError(index)
        return self._layers[index]

    def mark_unfused_tensors_as_debug_tensors(self) -> bool:
        return True


# -- optimisation profile -------------------------------------------------------------------------------------------

class IOptimizationProfile:
    """``trt.IOptimizationProfile``: min/opt/max shapes per input, checked as ``setDimensions`` documents."""

    def __init__(self) -> None:
        self._shapes: dict[str, list[Dims | None]] = {}
        self.extra_memory_target = 1.0

    def _set(self, name: str, which: int, dims: Dims) -> bool:
        slots = self._shapes.setdefault(name, [None, None, None])
        if any(d < 0 for d in dims):
            return False
        for other_index, other in enumerate(slots):
            if other is None or other_index == which:
                continue
            if len(other) != len(dims):
                return False
            lo, hi = (other, dims) if other_index < which else (dims, other)
            if any(a > b for a, b in zip(lo, hi)):
                return False
        slots[which] = dims
        return True

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
        """Raise RuntimeError, as the bindings do, when a shape is inconsistent with the others."""
        for which, label, shape in ((0, "min", min), (1, "opt", opt), (2, "max", max)):
            if not self._set(input, which, _dims(shape, "set_shape")):
                raise RuntimeError(f"Shape provided for {label} is inconsistent with other shapes.")

    def get_shape(self, input: str) -> list[Dims]:
        slots = self._shapes.get(input)
        return [] if not slots or slots[0] is None else [s for s in slots if s is not None]

    def set_shape_input(self, input: str, min: Any, opt: Any, max: Any) -> None:
        raise RuntimeError(f"{input} is not a shape tensor input of the network")

    def get_shape_input(self, input: str) -> list:
        return []

    def _complete(self) -> bool:
        return all(all(s is not None for s in slots) for slots in self._shapes.values())

    def __bool__(self) -> bool:
        return self._complete()


# -- builder config -------------------------------------------------------------------------------------------------

_DEFAULT_FLAGS = ("TF32",)  # set by default in TensorRT 10 and 11


class IBuilderConfig:
    """``trt.IBuilderConfig``: builder flags, profiles, memory pools, timing cache, optimisation level."""

    def __init__(self, builder: "Builder") -> None:
        self._builder = builder
        self._flags = 0
        for name in _DEFAULT_FLAGS:
            self._flags |= 1 << int(getattr(BuilderFlag, name))
        self._profiles: list[IOptimizationProfile] = []
        self._pools: dict[int, int] = {int(MemoryPoolType.WORKSPACE): 1 << 40}
        self._cache: ITimingCache | None = None
        self._preview: dict[int, bool] = {}
        self._tactic_sources = 0
        for name in ("EDGE_MASK_CONVOLUTIONS", "JIT_CONVOLUTIONS"):
            self._tactic_sources |= 1 << int(getattr(TacticSource, name))
        self._builder_optimization_level = 3
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self.hardware_compatibility_level = HardwareCompatibilityLevel.NONE
        self.engine_capability = EngineCapability.STANDARD
        self.default_device_type = DeviceType.GPU
        self.DLA_core = -1
        self.max_aux_streams = -1
        self.avg_timing_iterations = 1
        self.progress_monitor = None
        self.runtime_platform = RuntimePlatform.SAME_AS_BUILD
        self.tiling_optimization_level = TilingOptimizationLevel.NONE
        self.l2_limit_for_tiling = -1
        self.max_num_tactics = -1
        self.profile_stream = 0
        self.plugins_to_serialize: list[str] = []
        if MAJOR == 10:
            self.int8_calibrator = None
            self.algorithm_selector = None
            self._quantization = 0

    # flags
    @property
    def flags(self) -> int:
        return self._flags

    @flags.setter
    def flags(self, value: int) -> None:
        self._flags = int(value)

    def set_flag(self, flag: Any) -> None:
        _check_enum(flag, BuilderFlag, "set_flag")
        self._flags |= 1 << int(flag)

    def clear_flag(self, flag: Any) -> None:
        _check_enum(flag, BuilderFlag, "clear_flag")
        self._flags &= ~(1 << int(flag))

    def get_flag(self, flag: Any) -> bool:
        _check_enum(flag, BuilderFlag, "get_flag")
        return bool(self._flags & (1 << int(flag)))

    def _flag_names(self) -> list[str]:
        return sorted({m.name for m in BuilderFlag.__members__.values() if self._flags & (1 << int(m))})

    # profiles
    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        """Index of the added profile, or -1 when it is incomplete (min, opt and max not all set)."""
        if not isinstance(profile, IOptimizationProfile):
            raise TypeError("add_optimization_profile(): incompatible function arguments")
        if not profile._complete():
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    # memory pools, tactic sources, preview features
    def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
        _check_enum(pool, MemoryPoolType, "set_memory_pool_limit")
        self._pools[int(pool)] = int(pool_size)

    def get_memory_pool_limit(self, pool: Any) -> int:
        _check_enum(pool, MemoryPoolType, "get_memory_pool_limit")
        return self._pools.get(int(pool), 0)

    def set_tactic_sources(self, tactic_sources: int) -> bool:
        self._tactic_sources = int(tactic_sources)
        return True

    def get_tactic_sources(self) -> int:
        return self._tactic_sources

    def set_preview_feature(self, feature: Any, enable: bool) -> None:
        _check_enum(feature, PreviewFeature, "set_preview_feature")
        self._preview[int(feature)] = bool(enable)

    def get_preview_feature(self, feature: Any) -> bool:
        _check_enum(feature, PreviewFeature, "get_preview_feature")
        return self._preview.get(int(feature), False)

    @property
    def builder_optimization_level(self) -> int:
        return self._builder_optimization_level

    @builder_optimization_level.setter
    def builder_optimization_level(self, level: int) -> None:
        if not 0 <= int(level) <= 5:
            api_error(self._builder.logger, "IBuilderConfig::setBuilderOptimizationLevel",
                      f"level {level} outside [0, 5]")
            return
        self._builder_optimization_level = int(level)

    # timing cache
    def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache | None:
        """A cache from serialized bytes (empty: a new cache); None, with an error logged, for bytes that are not
        a serialized timing cache."""
        raw = as_buffer(serialized_timing_cache, "create_timing_cache")
        if not raw:
            return ITimingCache(VERSION, DEVICE, set())
        payload = _formats.decode_cache(raw)
        if payload is None:
            log(self._builder.logger, Severity.ERROR,
                "IBuilderConfig::createTimingCache: Error Code 1: Serialization (the timing cache blob is damaged: "
                "magic tag does not match)")
            return None
        return ITimingCache(str(payload.get("version")), str(payload.get("device")), set(payload.get("entries", [])))

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        """Attach ``cache``; False (not attached) when its verification header does not match this TensorRT version,
        or this device unless ``ignore_mismatch``."""
        if not isinstance(cache, ITimingCache):
            raise TypeError("set_timing_cache(): incompatible function arguments; expected ITimingCache, got "
                            f"{type(cache).__name__}")
        if cache._version != VERSION or (cache._device != DEVICE and not ignore_mismatch):
            log(self._builder.logger, Severity.ERROR,
                f"IBuilderConfig::setTimingCache: Error Code 4: the timing cache was made by TensorRT "
                f"{cache._version} on {cache._device}; this is TensorRT {VERSION} on {DEVICE}")
            return False
        self._cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._cache

    # device types
    def set_device_type(self, layer: Any, device_type: Any) -> None:
        pass

    def get_device_type(self, layer: Any) -> Any:
        return DeviceType.GPU

    def is_device_type_set(self, layer: Any) -> bool:
        return False

    def reset_device_type(self, layer: Any) -> None:
        pass

    def can_run_on_DLA(self, layer: Any) -> bool:
        return False

    def reset(self) -> None:
        self.__init__(self._builder)  # type: ignore[misc]

    # quantization flags (10.x only; removed with weak typing in 11)
    def set_quantization_flag(self, flag: Any) -> None:
        _check_enum(flag, QuantizationFlag, "set_quantization_flag")
        self._quantization |= 1 << int(flag)

    def clear_quantization_flag(self, flag: Any) -> None:
        _check_enum(flag, QuantizationFlag, "clear_quantization_flag")
        self._quantization &= ~(1 << int(flag))

    def get_quantization_flag(self, flag: Any) -> bool:
        _check_enum(flag, QuantizationFlag, "get_quantization_flag")
        return bool(self._quantization & (1 << int(flag)))


if MAJOR >= 11:
    for _name in ("set_quantization_flag", "clear_quantization_flag", "get_quantization_flag"):
        delattr(IBuilderConfig, _name)


# -- builder --------------------------------------------------------------------------------------------------------

_PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4")


class Builder:
    """``trt.Builder(logger)``: creates networks, configs and profiles, and builds serialized plans."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.max_DLA_batch_size = 1
        self.num_DLA_cores = 0
        self.error_recorder = None
        self.gpu_allocator = None

    # 10.x only (removed in 11 with weak typing)
    platform_has_tf32 = True
    platform_has_fast_fp16 = True
    platform_has_fast_int8 = True

    def create_network(self, flags: int = 0) -> INetworkDefinition | None:
        known = 0
        for member in NetworkDefinitionCreationFlag.__members__.values():
            known |= 1 << int(member)
        if int(flags) & ~known:
            api_error(self.logger, "IBuilder::createNetworkV2", f"invalid network creation flags {flags:#x}")
            return None
        return INetworkDefinition(self, int(flags))

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig(self)

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def get_plugin_registry(self) -> Any:
        return get_plugin_registry()

    def is_network_supported(self, network: INetworkDefinition, config: IBuilderConfig) -> bool:
        return self._validate(network, config) is None

    def _validate(self, network: INetworkDefinition, config: IBuilderConfig) -> str | None:
        """The reason TensorRT would refuse to build, or None."""
        if network.num_outputs == 0:
            return "Network must have at least one output"
        dynamic = [t for t in network._inputs if any(d < 0 for d in t.shape)]
        if dynamic and not config._profiles:
            return (f"Network has dynamic or shape inputs, but no optimization profile has been defined "
                    f"({dynamic[0].name})")
        for index, profile in enumerate(config._profiles):
            for name in profile._shapes:
                if not any(t.name == name for t in network._inputs):
                    return f"optimization profile {index} names {name}, which is not an input of the network"
            for tensor in network._inputs:
                shapes = profile.get_shape(tensor.name)
                if not shapes:
                    if any(d < 0 for d in tensor.shape):
                        return f"{tensor.name}: dynamic input is missing dimensions in profile {index}"
                    continue
                for label, dims in zip(("min", "opt", "max"), shapes):
                    if len(dims) != len(tensor.shape):
                        return (f"{tensor.name}: profile {index} {label} dims {dims} have rank {len(dims)}, the "
                                f"network input has rank {len(tensor.shape)}")
                    for axis, (want, got) in enumerate(zip(tensor.shape, dims)):
                        if want >= 0 and want != got:
                            return (f"{tensor.name}: profile {index} {label} dimension {axis} is {got}, the network "
                                    f"fixes it to {want}")
        if MAJOR == 10 and network.strongly_typed:
            used = [f for f in _PRECISION_FLAGS if hasattr(BuilderFlag, f) and config.get_flag(getattr(BuilderFlag, f))]
            if used:
                log(self.logger, Severity.WARNING,
                    f"precision builder flags {used} have no effect on a strongly typed network")
        registry = get_plugin_registry()
        for plugin in sorted(network._plugins):
            if not registry.has(plugin):
                return f"plugin {plugin} is not registered (call init_libnvinfer_plugins)"
        return None

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        """The serialized plan, or None with the reason logged as an error (as TensorRT reports failures)."""
        if not isinstance(network, INetworkDefinition) or not isinstance(config, IBuilderConfig):
            raise TypeError("build_serialized_network(): incompatible function arguments")
        problem = self._validate(network, config)
        if problem is not None:
            log(self.logger, Severity.ERROR, f"IBuilder::buildSerializedNetwork: Error Code 4: {problem}")
            return None
        profiles = [{t.name: [list(s) for s in p.get_shape(t.name)] or [list(t.shape)] * 3 for t in network._inputs}
                    for p in config._profiles] or [{t.name: [list(t.shape)] * 3 for t in network._inputs}]
        strongly_typed = network.strongly_typed
        flag_names = config._flag_names()
        halves = any(t.dtype == DataType.HALF for t in network._inputs + network._outputs)
        fp16_kernels = (strongly_typed and halves) or "FP16" in flag_names
        keys = self._timing_keys(network, profiles, fp16_kernels)
        cache = config._cache
        if cache is not None and not config.get_flag(BuilderFlag.DISABLE_TIMING_CACHE):
            missing = keys - cache._entries
            if missing and config.get_flag(BuilderFlag.ERROR_ON_TIMING_CACHE_MISS):
                log(self.logger, Severity.ERROR,
                    f"IBuilder::buildSerializedNetwork: Error Code 4: {len(missing)} timing cache misses")
                return None
            cache._entries |= keys
        io = []
        for tensor, mode in [(t, "INPUT") for t in network._inputs] + [(t, "OUTPUT") for t in network._outputs]:
            io.append({"name": tensor.name, "mode": mode, "dtype": tensor.dtype.name, "shape": list(tensor.shape),
                       "dim_names": list(tensor._dim_names),
                       "dim_exprs": network._output_dim_exprs.get(tensor.name) if mode == "OUTPUT" else None})
        max_bytes = sum(_volume(p[t.name][2]) * (t.dtype.itemsize or 1) for p in profiles for t in network._inputs)
        plan = {
            "version": VERSION,
            "device": DEVICE,
            "strongly_typed": strongly_typed,
            "network_flags": int(network.flags),
            "builder_flags": flag_names,
            "fp16_kernels": bool(fp16_kernels),
            "io": io,
            "profiles": profiles,
            "plugins": sorted(network._plugins),
            "layers": len(network._layers),
            "source": network._source,
            "builder_optimization_level": config.builder_optimization_level,
            "hardware_compatibility_level": config.hardware_compatibility_level.name,
            "version_compatible": config.get_flag(BuilderFlag.VERSION_COMPATIBLE),
            "device_memory_size": _align(4 * max_bytes + 4096),
            "timing_cache_used": cache is not None,
            "refit": self._refit_record(network, config),
        }
        log(self.logger, Severity.INFO, f"Engine built: {len(io)} I/O tensors, {len(profiles)} profile(s)")
        return IHostMemory(_formats.encode_plan(plan))

    @staticmethod
    def _refit_record(network: INetworkDefinition, config: IBuilderConfig) -> dict[str, Any]:
        """Refittable (REFIT or REFIT_IDENTICAL) and stripped (STRIP_PLAN: no weight values in the plan)."""
        refittable = any(hasattr(BuilderFlag, f) and config.get_flag(getattr(BuilderFlag, f))
                         for f in ("REFIT", "REFIT_IDENTICAL"))
        stripped = refittable and config.get_flag(BuilderFlag.STRIP_PLAN)
        weights = {n: {**w, "digest": None if stripped else w["digest"]} for n, w in network._weights.items()}
        return {"refittable": refittable, "stripped": stripped, "weights": weights if refittable else {}}

    @staticmethod
    def _timing_keys(network: INetworkDefinition, profiles: list[dict], fp16: bool) -> set[str]:
        keys = set()
        for layer in network._layers:
            digest = hashlib.sha256(repr((layer.metadata, layer.name, profiles, fp16)).encode()).hexdigest()[:16]
            keys.add(f"{layer.type.name}:{digest}")
        return keys


if MAJOR >= 11:
    for _name in ("platform_has_tf32", "platform_has_fast_fp16", "platform_has_fast_int8"):
        delattr(Builder, _name)


def _volume(shape: Any) -> int:
    v = 1
    for d in shape:
        v *= max(int(d), 0)
    return v


def _align(n: int, to: int = 256) -> int:
    return (int(n) + to - 1) // to * to


# -- ONNX parser ----------------------------------------------------------------------------------------------------

class ParserError:
    """``trt.ParserError``: one error of :class:`OnnxParser`."""

    def __init__(self, code: Any, desc: str, node: int = -1, node_name: str = "", node_operator: str = "") -> None:
        self._code, self._desc = code, desc
        self._node, self._node_name, self._node_operator = node, node_name, node_operator

    def code(self) -> Any:
        return self._code

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._node_name

    def node_operator(self) -> str:
        return self._node_operator

    def file(self) -> str:
        return "ModelImporter.cpp"

    def line(self) -> int:
        return 0

    def func(self) -> str:
        return "parseGraph"

    def __str__(self) -> str:
        where = (f"In node {self._node} with name: {self._node_name} and operator: {self._node_operator} "
                 if self._node >= 0 else "")
        return f"{where}(parseGraph): {self._code.name}: {self._desc}"

    __repr__ = __str__


# ONNX TensorProto element types -> TensorRT DataType names (types TensorRT cannot hold are absent).
_ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 16: "BF16", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8",
                17: "FP8", 22: "INT4", 23: "FP4"}
_LAYER_OF_OP = {"Conv": "CONVOLUTION", "ConvTranspose": "DECONVOLUTION", "MatMul": "MATRIX_MULTIPLY",
                "Gemm": "MATRIX_MULTIPLY", "Add": "ELEMENTWISE", "Sub": "ELEMENTWISE", "Mul": "ELEMENTWISE",
                "Div": "ELEMENTWISE", "Pow": "ELEMENTWISE", "Softmax": "SOFTMAX", "Reshape": "SHUFFLE",
                "Transpose": "SHUFFLE", "Flatten": "SHUFFLE", "Squeeze": "SQUEEZE", "Unsqueeze": "UNSQUEEZE",
                "Concat": "CONCATENATION", "Gather": "GATHER", "GatherElements": "GATHER", "Slice": "SLICE",
                "Shape": "SHAPE", "Cast": "CAST", "Constant": "CONSTANT", "Identity": "IDENTITY",
                "ReduceMean": "REDUCE", "ReduceSum": "REDUCE", "ReduceMax": "REDUCE", "Where": "SELECT",
                "Resize": "RESIZE", "ScatterElements": "SCATTER", "ScatterND": "SCATTER", "TopK": "TOPK",
                "Expand": "SLICE", "Sigmoid": "ACTIVATION", "Relu": "ACTIVATION", "Tanh": "ACTIVATION",
                "Erf": "UNARY", "Sqrt": "UNARY", "Exp": "UNARY", "Sin": "UNARY", "Cos": "UNARY",
                "InstanceNormalization": "NORMALIZATION", "GroupNormalization": "NORMALIZATION",
                "LayerNormalization": "NORMALIZATION", "CumSum": "CUMULATIVE", "ArgMax": "TOPK"}
_MIN_OPSET = 9


def _inferred_static_dims(proto: Any) -> dict[str, list[int | None]]:
    """Output dims that shape inference proves constant (the exporter may still have given them a name)."""
    import onnx

    try:
        probe = onnx.ModelProto()
        probe.CopyFrom(proto)
        for out in probe.graph.output:
            out.type.tensor_type.ClearField("shape")
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:
        return {}
    return {o.name: [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
            for o in inferred.graph.output}


class OnnxParser(OnnxErrors):
    """``trt.OnnxParser(network, logger)``: populates ``network`` from an ONNX model.

    Reads the model with the ``onnx`` package (external weights are checked for
    presence, not loaded). Refuses, with errors, what TensorRT's parser
    refuses: an unreadable model, opsets below 9, ops of custom domains with no
    registered plugin, ``ScatterElements`` with a reduction when the
    ``ScatterElements`` plugin is not registered or its indices are not INT64,
    graph inputs or outputs of a type TensorRT has no ``DataType`` for.
    """

    def __init__(self, network: INetworkDefinition, logger: Any) -> None:
        if not isinstance(network, INetworkDefinition):
            raise TypeError("OnnxParser(): incompatible constructor arguments")
        self._network = network
        self._logger = logger
        self._errors: list[ParserError] = []
        self.flags = 1 << int(OnnxParserFlag.NATIVE_INSTANCENORM)  # on by default (NvOnnxParser.h)

    def set_flag(self, flag: Any) -> None:
        _check_enum(flag, OnnxParserFlag, "set_flag")
        self.flags |= 1 << int(flag)

    def clear_flag(self, flag: Any) -> None:
        _check_enum(flag, OnnxParserFlag, "clear_flag")
        self.flags &= ~(1 << int(flag))

    def get_flag(self, flag: Any) -> bool:
        _check_enum(flag, OnnxParserFlag, "get_flag")
        return bool(self.flags & (1 << int(flag)))

    def supports_operator(self, op_name: str) -> bool:
        return op_name in _LAYER_OF_OP

    def set_builder_config(self, builder_config: IBuilderConfig) -> bool:
        return isinstance(builder_config, IBuilderConfig)

    def parse_from_file(self, model: str) -> bool:
        read = self._read_file(model)
        return read is not None and self._import(read[0], Path(read[1]).parent, read[1])

    def parse(self, model: Any, path: str | None = None) -> bool:
        proto = self._read_bytes(model, "parse")
        return proto is not None and self._import(proto, Path(path).parent if path else None, path or "<bytes>")

    def _import(self, proto: Any, folder: Path | None, source: str) -> bool:
        import onnx

        net = self._network
        graph = proto.graph
        opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
        if opsets.get("ai.onnx", 0) < _MIN_OPSET:
            return self._fail(ErrorCode.UNSUPPORTED_GRAPH, f"opset {opsets.get('ai.onnx')} is not supported; the "
                              f"parser supports opset {_MIN_OPSET} and above")
        for init in graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                location = {e.key: e.value for e in init.external_data}.get("location", "")
                if folder is None or not (folder / location).is_file():
                    return self._fail(ErrorCode.INVALID_GRAPH, f"Failed to open file {location} holding the "
                                      f"weights of {init.name}")
        types = {vi.name: vi.type.tensor_type.elem_type for vi in
                 list(graph.input) + list(graph.output) + list(graph.value_info)}
        types.update({i.name: i.data_type for i in graph.initializer})
        registry = get_plugin_registry()
        native_instancenorm = self.get_flag(OnnxParserFlag.NATIVE_INSTANCENORM)
        layers: list[ILayer] = []
        plugins: set[str] = set()
        for index, node in enumerate(graph.node):
            domain = node.domain or "ai.onnx"
            name = node.name or f"node_{index}"
            plugin = None
            if domain != "ai.onnx":
                if not registry.has(node.op_type):
                    return self._fail(ErrorCode.UNSUPPORTED_NODE, f"No importer registered for op: {node.op_type}",
                                      index, name, node.op_type)
                plugin = node.op_type
            elif node.op_type == "ScatterElements":
                attrs = {a.name: a for a in node.attribute}
                reduction = attrs["reduction"].s.decode() if "reduction" in attrs else "none"
                if reduction != "none":
                    indices = node.input[1] if len(node.input) > 1 else ""
                    if indices in types and types[indices] != onnx.TensorProto.INT64:
                        return self._fail(ErrorCode.UNSUPPORTED_NODE_DATATYPE, "ScatterElements with a reduction "
                                          "takes INT64 indices only", index, name, node.op_type)
                    if not registry.has("ScatterElements"):
                        return self._fail(ErrorCode.UNSUPPORTED_NODE, "Plugin not found, are the plugin name, version, "
                                          "and namespace correct? (ScatterElements)", index, name, node.op_type)
                    plugin = "ScatterElements"
            elif node.op_type == "InstanceNormalization" and not native_instancenorm:
                if not registry.has("InstanceNormalization_TRT"):
                    return self._fail(ErrorCode.UNSUPPORTED_NODE, "Plugin not found, are the plugin name, version, "
                                      "and namespace correct? (InstanceNormalization_TRT)", index, name,
                                      node.op_type)
                plugin = "InstanceNormalization_TRT"
            if plugin is not None:
                plugins.add(plugin)
                layer_type = LayerType.PLUGIN_V3
            else:
                layer_type = getattr(LayerType, _LAYER_OF_OP.get(node.op_type, "IDENTITY"))
            layers.append(ILayer(name, layer_type, node.op_type, len(node.input), len(node.output)))
        inits = {i.name for i in graph.initializer}
        static = _inferred_static_dims(proto)
        inputs, outputs, exprs = [], [], {}
        for vi, kind in [(vi, "input") for vi in graph.input if vi.name not in inits] + \
                        [(vi, "output") for vi in graph.output]:
            tt = vi.type.tensor_type
            trt_name = _ONNX_TO_TRT.get(tt.elem_type)
            if trt_name is None or not hasattr(DataType, trt_name):
                return self._fail(ErrorCode.UNSUPPORTED_GRAPH, f"graph {kind} {vi.name} has ONNX data type "
                                  f"{onnx.TensorProto.DataType.Name(tt.elem_type)}, which TensorRT does not support")
            dims, names, spec = [], [], []
            known = static.get(vi.name, []) if kind == "output" else []
            for axis, d in enumerate(tt.shape.dim):
                if not d.HasField("dim_value") and axis < len(known) and known[axis] is not None:
                    dims.append(known[axis])  # TensorRT's own shape analysis knows it; the export only named it
                    names.append(None)
                    spec.append(known[axis])
                elif d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                    names.append(None)
                    spec.append(int(d.dim_value))
                else:
                    dims.append(-1)
                    names.append(d.dim_param or None)
                    spec.append(d.dim_param or "?")
            tensor = ITensor(vi.name, getattr(DataType, trt_name), Dims(dims), names)
            (inputs if kind == "input" else outputs).append(tensor)
            if kind == "output":
                exprs[vi.name] = spec
        for tensor in inputs:
            tensor.is_network_input = True
            net._inputs.append(tensor)
        for tensor in outputs:
            net.mark_output(tensor)
        net._layers.extend(layers)
        net._plugins |= plugins
        net._output_dim_exprs.update(exprs)
        net._source = os.path.basename(source)
        net._weights.update(onnx_weights(proto, folder))
        net.name = graph.name or net.name
        return True
