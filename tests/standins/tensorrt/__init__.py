"""Test stand-in for NVIDIA TensorRT's Python package (``import tensorrt``), 10.x or 11.x.

Imports only with ``$CATOME_TENSORRT_STANDIN`` set to the version to play
(``10.13.0.35`` or ``11.1.0.106``, say) and ``tests/standins`` on ``sys.path``;
the ``tensorrt_standin`` fixtures in ``tests/backends/conftest.py`` do both.

Names, enums (with their values) and signatures follow NVIDIA's published
bindings (``python/src/infer/pyCore.cpp``, ``pyFoundationalTypes.cpp``,
``pyGraph.cpp``, ``python/src/parsers/pyOnnx.cpp`` and the wheel's
``tensorrt/__init__.py`` in NVIDIA/TensorRT): 11.x lacks the precision
builder flags (FP16, BF16, INT8, FP8, INT4, FP4, OBEY/PREFER_PRECISION_CONSTRAINTS),
``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``, ``QuantizationFlag``,
``Builder.platform_has_fast_fp16``, ``ICudaEngine.device_memory_size``, ``ILayer.precision`` /
``precision_is_set`` and the other members removed in 11, and treats every network as strongly typed.
Refitting (``Refitter``, ``OnnxParserRefitter``, ``Weights``, ``WeightsRole``; ``_refit.py``) follows
``py::class_<IRefitter>`` and the parser refitter of the same sources.
Nothing here knows the code under test. A built plan is JSON describing what
was built (:func:`tensorrt._formats.describe_plan`); no kernels run.
"""

from ._version import MAJOR, VERSION as __version__  # noqa: F401  (first: refuses to import unless asked for)
from ._core import (  # noqa: F401
    IHostMemory, ILogger, IPluginCreator, IPluginRegistry, Logger, get_plugin_registry, init_libnvinfer_plugins,
)
from ._enums import (  # noqa: F401
    BuilderFlag, DataType, DeviceType, Dims, EngineCapability, ErrorCode, ExecutionContextAllocationStrategy,
    HardwareCompatibilityLevel, LayerType, MemoryPoolType, NetworkDefinitionCreationFlag, OnnxParserFlag,
    OptProfileSelector, PreviewFeature, ProfilingVerbosity, QuantizationFlag, RuntimePlatform, SerializationFlag,
    TacticSource, TensorFormat, TensorIOMode, TensorLocation, TilingOptimizationLevel,
)
from ._build import (  # noqa: F401
    Builder, IBuilderConfig, ILayer, INetworkDefinition, IOptimizationProfile, ITensor, ITimingCache, OnnxParser,
    ParserError,
)
from ._runtime import ICudaEngine, IExecutionContext, Runtime  # noqa: F401
from ._refit import OnnxParserRefitter, Refitter, Weights, WeightsRole  # noqa: F401

if QuantizationFlag is None:  # removed in 11
    del QuantizationFlag

Logger.Severity = ILogger.Severity

float32 = DataType.FLOAT
float16 = DataType.HALF
bfloat16 = DataType.BF16
int8 = DataType.INT8
int32 = DataType.INT32
int64 = DataType.INT64
bool = DataType.BOOL  # noqa: A001  (as in tensorrt/__init__.py)
uint8 = DataType.UINT8
fp8 = DataType.FP8
int4 = DataType.INT4
fp4 = DataType.FP4


def volume(iterable):  # type: ignore[no-untyped-def]
    """Product of the dimensions (1 for an empty shape)."""
    vol = 1
    for elem in iterable:
        vol *= elem
    return vol


def nptype(trt_type):  # type: ignore[no-untyped-def]
    """The numpy type of a :class:`DataType` (TypeError where numpy has none)."""
    import numpy as np

    mapping = {float32: np.float32, float16: np.float16, int8: np.int8, int32: np.int32, int64: np.int64,
               bool: np.bool_, uint8: np.uint8}
    if trt_type in mapping:
        return mapping[trt_type]
    raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
