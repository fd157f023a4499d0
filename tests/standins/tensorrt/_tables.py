"""Enum members and values of the TensorRT Python bindings, per major version.

Names are the ``.value("...")`` entries of ``python/src/infer/pyCore.cpp``,
``pyFoundationalTypes.cpp``, ``pyGraph.cpp`` and ``python/src/parsers/pyOnnx.cpp``
in NVIDIA/TensorRT (branch ``release/10.13`` for 10.x, ``main`` at the 11.1
release for 11.x); values are the C++ enumerators of ``include/NvInfer*.h`` and
``NvOnnxParser.h`` they bind to.
"""

from __future__ import annotations

ENUMS_10: dict[str, dict[str, int]] = {
    'ExecutionContextAllocationStrategy': {
        'STATIC': 0, 'ON_PROFILE_CHANGE': 1, 'USER_MANAGED': 2,
    },
    'SerializationFlag': {
        'EXCLUDE_WEIGHTS': 0, 'EXCLUDE_LEAN_RUNTIME': 1,
    },
    'EngineCapability': {
        'STANDARD': 0, 'SAFETY': 1, 'DLA_STANDALONE': 2,
    },
    'TensorLocation': {
        'DEVICE': 0, 'HOST': 1,
    },
    'TensorIOMode': {
        'NONE': 0, 'INPUT': 1, 'OUTPUT': 2,
    },
    'BuilderFlag': {
        'FP16': 0, 'BF16': 17, 'INT8': 1, 'DEBUG': 2, 'GPU_FALLBACK': 3, 'REFIT': 4, 'DISABLE_TIMING_CACHE': 5,
        'EDITABLE_TIMING_CACHE': 27, 'TF32': 6, 'SPARSE_WEIGHTS': 7, 'SAFETY_SCOPE': 8,
        'OBEY_PRECISION_CONSTRAINTS': 9, 'PREFER_PRECISION_CONSTRAINTS': 10, 'DIRECT_IO': 11,
        'REJECT_EMPTY_ALGORITHMS': 12, 'VERSION_COMPATIBLE': 13, 'EXCLUDE_LEAN_RUNTIME': 14, 'FP8': 15,
        'ERROR_ON_TIMING_CACHE_MISS': 16, 'DISABLE_COMPILATION_CACHE': 18, 'WEIGHTLESS': 19, 'STRIP_PLAN': 19,
        'REFIT_IDENTICAL': 20, 'WEIGHT_STREAMING': 21, 'INT4': 22, 'REFIT_INDIVIDUAL': 23, 'STRICT_NANS': 24,
        'MONITOR_MEMORY': 25, 'FP4': 26, 'DISTRIBUTIVE_INDEPENDENCE': 28,
    },
    'MemoryPoolType': {
        'WORKSPACE': 0, 'DLA_MANAGED_SRAM': 1, 'DLA_LOCAL_DRAM': 2, 'DLA_GLOBAL_DRAM': 3, 'TACTIC_DRAM': 4,
        'TACTIC_SHARED_MEMORY': 5,
    },
    'QuantizationFlag': {
        'CALIBRATE_BEFORE_FUSION': 0,
    },
    'PreviewFeature': {
        'PROFILE_SHARING_0806': 0, 'ALIASED_PLUGIN_IO_10_03': 1, 'RUNTIME_ACTIVATION_RESIZE_10_10': 2,
    },
    'HardwareCompatibilityLevel': {
        'NONE': 0, 'AMPERE_PLUS': 1, 'SAME_COMPUTE_CAPABILITY': 2,
    },
    'RuntimePlatform': {
        'SAME_AS_BUILD': 0, 'WINDOWS_AMD64': 1,
    },
    'DeviceType': {
        'GPU': 0, 'DLA': 1,
    },
    'ProfilingVerbosity': {
        'LAYER_NAMES_ONLY': 0, 'DETAILED': 2, 'NONE': 1,
    },
    'TacticSource': {
        'CUBLAS': 0, 'CUBLAS_LT': 1, 'CUDNN': 2, 'EDGE_MASK_CONVOLUTIONS': 3, 'JIT_CONVOLUTIONS': 4,
    },
    'TilingOptimizationLevel': {
        'NONE': 0, 'FAST': 1, 'MODERATE': 2, 'FULL': 3,
    },
    'NetworkDefinitionCreationFlag': {
        'EXPLICIT_BATCH': 0, 'STRONGLY_TYPED': 1, 'PREFER_AOT_PYTHON_PLUGINS': 3, 'PREFER_JIT_PYTHON_PLUGINS': 2,
    },
    'DataType': {
        'FLOAT': 0, 'HALF': 1, 'BF16': 7, 'INT8': 2, 'INT32': 3, 'INT64': 8, 'BOOL': 4, 'UINT8': 5, 'FP8': 6,
        'INT4': 9, 'FP4': 10, 'E8M0': 11,
    },
    'TensorFormat': {
        'LINEAR': 0, 'CHW2': 1, 'HWC8': 2, 'CHW4': 3, 'CHW16': 4, 'CHW32': 5, 'DHWC8': 6, 'CDHW32': 7, 'HWC': 8,
        'DLA_LINEAR': 9, 'DLA_HWC4': 10, 'HWC16': 11, 'DHWC': 12,
    },
    'OnnxParserFlag': {
        'NATIVE_INSTANCENORM': 0, 'ENABLE_UINT8_AND_ASYMMETRIC_QUANTIZATION_DLA': 1,
    },
}

ENUMS_11: dict[str, dict[str, int]] = {
    'ExecutionContextAllocationStrategy': {
        'STATIC': 0, 'ON_PROFILE_CHANGE': 1, 'USER_MANAGED': 2,
    },
    'SerializationFlag': {
        'EXCLUDE_WEIGHTS': 0, 'EXCLUDE_LEAN_RUNTIME': 1, 'INCLUDE_REFIT': 2,
    },
    'EngineCapability': {
        'STANDARD': 0, 'SAFETY': 1, 'DLA_STANDALONE': 2,
    },
    'TensorLocation': {
        'DEVICE': 0, 'HOST': 1,
    },
    'TensorIOMode': {
        'NONE': 0, 'INPUT': 1, 'OUTPUT': 2,
    },
    'BuilderFlag': {
        'DEBUG': 2, 'GPU_FALLBACK': 3, 'REFIT': 4, 'DISABLE_TIMING_CACHE': 5, 'EDITABLE_TIMING_CACHE': 26, 'TF32': 6,
        'SPARSE_WEIGHTS': 7, 'SAFETY_SCOPE': 8, 'DIRECT_IO': 11, 'VERSION_COMPATIBLE': 12,
        'EXCLUDE_LEAN_RUNTIME': 13, 'ERROR_ON_TIMING_CACHE_MISS': 15, 'DISABLE_COMPILATION_CACHE': 17,
        'STRIP_PLAN': 18, 'REFIT_IDENTICAL': 19, 'WEIGHT_STREAMING': 20, 'REFIT_INDIVIDUAL': 22, 'STRICT_NANS': 23,
        'MONITOR_MEMORY': 24, 'DISTRIBUTIVE_INDEPENDENCE': 27,
    },
    'MemoryPoolType': {
        'WORKSPACE': 0, 'DLA_MANAGED_SRAM': 1, 'DLA_LOCAL_DRAM': 2, 'DLA_GLOBAL_DRAM': 3, 'TACTIC_DRAM': 4,
        'TACTIC_SHARED_MEMORY': 5,
    },
    'PreviewFeature': {
        'ALIASED_PLUGIN_IO_10_03': 0, 'RUNTIME_ACTIVATION_RESIZE_10_10': 1,
    },
    'HardwareCompatibilityLevel': {
        'NONE': 0, 'AMPERE_PLUS': 1, 'SAME_COMPUTE_CAPABILITY': 2,
    },
    'RuntimePlatform': {
        'SAME_AS_BUILD': 0, 'WINDOWS_AMD64': 1,
    },
    'DeviceType': {
        'GPU': 0, 'DLA': 1,
    },
    'ProfilingVerbosity': {
        'LAYER_NAMES_ONLY': 0, 'DETAILED': 2, 'NONE': 1,
    },
    'TacticSource': {
        'EDGE_MASK_CONVOLUTIONS': 0, 'JIT_CONVOLUTIONS': 1,
    },
    'TilingOptimizationLevel': {
        'NONE': 0, 'FAST': 1, 'MODERATE': 2, 'FULL': 3,
    },
    'NetworkDefinitionCreationFlag': {
        'STRONGLY_TYPED': 0, 'PREFER_AOT_PYTHON_PLUGINS': 2, 'PREFER_JIT_PYTHON_PLUGINS': 1,
    },
    'DataType': {
        'FLOAT': 0, 'HALF': 1, 'BF16': 7, 'INT8': 2, 'INT32': 3, 'INT64': 8, 'BOOL': 4, 'UINT8': 5, 'FP8': 6,
        'INT4': 9, 'FP4': 10, 'E8M0': 11,
    },
    'TensorFormat': {
        'LINEAR': 0, 'CHW2': 1, 'HWC8': 2, 'CHW4': 3, 'CHW16': 4, 'CHW32': 5, 'DHWC8': 6, 'CDHW32': 7, 'HWC': 8,
        'DLA_LINEAR': 9, 'DLA_HWC4': 10, 'HWC16': 11, 'DHWC': 12,
    },
    'OnnxParserFlag': {
        'NATIVE_INSTANCENORM': 0, 'ENABLE_UINT8_AND_ASYMMETRIC_QUANTIZATION_DLA': 1, 'REPORT_CAPABILITY_DLA': 2,
        'ENABLE_PLUGIN_OVERRIDE': 3, 'ADJUST_FOR_DLA': 4,
    },
}

# LayerType, in value order (0, 1, 2, ...); 11.x appends the attention, KV-cache, MoE and collective layers.
LAYER_TYPES_10: tuple[str, ...] = (
    'CONVOLUTION', 'CAST', 'ACTIVATION', 'POOLING', 'LRN', 'SCALE', 'SOFTMAX', 'DECONVOLUTION', 'CONCATENATION',
    'ELEMENTWISE', 'PLUGIN', 'UNARY', 'PADDING', 'SHUFFLE', 'REDUCE', 'TOPK', 'GATHER', 'MATRIX_MULTIPLY',
    'RAGGED_SOFTMAX', 'CONSTANT', 'IDENTITY', 'PLUGIN_V2', 'SLICE', 'SHAPE', 'PARAMETRIC_RELU', 'RESIZE',
    'TRIP_LIMIT', 'RECURRENCE', 'ITERATOR', 'LOOP_OUTPUT', 'SELECT', 'FILL', 'QUANTIZE', 'DEQUANTIZE', 'CONDITION',
    'CONDITIONAL_INPUT', 'CONDITIONAL_OUTPUT', 'SCATTER', 'EINSUM', 'ASSERTION', 'ONE_HOT', 'NON_ZERO',
    'GRID_SAMPLE', 'NMS', 'REVERSE_SEQUENCE', 'NORMALIZATION', 'PLUGIN_V3', 'SQUEEZE', 'UNSQUEEZE', 'CUMULATIVE',
    'DYNAMIC_QUANTIZE',
)
LAYER_TYPES_11: tuple[str, ...] = LAYER_TYPES_10 + (
    'ATTENTION_INPUT', 'ATTENTION_OUTPUT', 'ROTARY_EMBEDDING', 'KV_CACHE_UPDATE', 'MOE', 'DIST_COLLECTIVE',
)
