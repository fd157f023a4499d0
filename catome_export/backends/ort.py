"""ONNX Runtime backend: one ``InferenceSession`` per stage, torch tensors in and out.

CPU execution provider everywhere; CUDA execution provider where
onnxruntime-gpu (1.21 or later, for DLPack) and a CUDA device are present.
Inputs are bound by address (``IOBinding.bind_input`` on
``tensor.data_ptr()``) and outputs are allocated by ONNX Runtime on the
stage's device and handed to torch through DLPack, so no tensor travels
through the host between stages. Empty tensors (a site with r = 0 has
[B, 0] index tensors, whose torch address is null) are bound as ONNX
Runtime values of the right shape instead.

On CUDA the backend owns a stream (:class:`~catome_export.backends.base.DeviceStream`)
and gives it to every session as the CUDA provider's ``user_compute_stream``
(ONNX Runtime takes the stream per session, not per run). Sessions of fp32
stages run with TF32 off (``use_tf32=0``), so they compute what the fp32
model computes; fp16 stages keep the provider's defaults. ONNX Runtime only
warns when its CUDA provider cannot load (a CUDA or cuDNN library missing)
and builds a CPU session instead, so every session is checked for the CUDA
provider right after it is made, and refused with the fix when it lacks it. Each run first
waits for the caller's current stream, which produced the inputs; with
``synchronize`` on (the default) ONNX Runtime waits for its stream before
the run returns, with it off the caller's stream waits for the backend's
stream instead, so the outputs are in order for the caller either way.

``onnxruntime`` is imported when a backend is created, never at module import.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from catome_export.checks import check_int
from catome_export.backends.base import DeviceStream, check_outputs, ordered_feeds, torch_dtype
from catome_export.backends.select import version_tuple
from catome_export.errors import CatomeError

if TYPE_CHECKING:
    from catome_export.engine.manifest import StageRecord
    from catome_export.engine.specs import StageSpec

logger = logging.getLogger(__name__)

_NUMPY_DTYPES: dict[torch.dtype, type] = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
_OPT_LEVELS = ("disable", "basic", "extended", "all")

CUDA_PROVIDER = "CUDAExecutionProvider"

MIN_GPU_VERSION = (1, 21)
"""Oldest onnxruntime-gpu whose ``OrtValue._get_c_value()`` supports ``__dlpack__`` (outputs handed to torch)."""


@dataclass(frozen=True)
class OrtOptions:
    """Session settings of the ONNX Runtime backend (see docs/runtime.md for the measurements)."""

    intra_op_threads: int | None = None
    """Threads inside one operator; None = the physical cores this process may run on."""
    inter_op_threads: int = 1
    """Threads across operators; 1, since execution is sequential."""
    optimization: str = "all"
    """Graph optimisation level: disable, basic, extended or all (ORT_ENABLE_ALL)."""
    mem_pattern: bool = False
    """Plan memory from the first run's shapes; off because K and R change at every checkpoint."""
    cpu_mem_arena: bool = True
    """Keep freed CPU buffers in ONNX Runtime's arena for the next run."""
    shared_arena: bool = True
    """With ``cpu_mem_arena``, on the CPU: one arena for every session of the process (all stages, every
    runtime) rather than one per session. Stages run one at a time, so they can reuse each other's buffers: no
    slower than per-session arenas at well under half the memory (SD 1.5 at 512 px, batch 2:
    5.9 GiB peak RSS against 14.4 GiB; docs/runtime.md)."""
    io_binding: bool = True
    """Bind torch tensors by address (True) or pass numpy views to ``session.run`` (False, CPU only)."""
    allow_spinning: bool = True
    """Let idle intra-op threads spin for work (fast on a dedicated CPU; turn off on a shared, busy one)."""
    stop_spinning_after_run: bool = True
    """With ``allow_spinning``: idle intra-op threads spin while a stage runs and stop when its run returns,
    so they do not compete with the controller's matching between stages (on SD 1.5 at 512 px this halved
    the controller's time on checkpoint steps; docs/runtime.md)."""
    synchronize: bool = True
    """CUDA: each run returns once its work on the backend's stream is done; False returns at once and orders
    the caller's current stream after the backend's stream instead (no host wait)."""
    log_severity: int = 3
    """ONNX Runtime log level: 0 verbose .. 4 fatal (3 = errors only)."""
    fused_graphs: bool = True
    """Load each stage's ONNX Runtime-fused graph (``stage_<k>.ort.onnx``, ONNX Runtime's own transformer fusions
    written at build time; catome_export.export.ort_optimize) where the manifest lists one; False, or a folder
    built with ``--ort-optimize off``, loads the standard graphs (the ones TensorRT builds from)."""

    def __post_init__(self) -> None:
        if self.optimization not in _OPT_LEVELS:
            raise CatomeError(f"ORT optimization must be one of {', '.join(_OPT_LEVELS)}, got {self.optimization!r}")
        if self.intra_op_threads is not None:
            check_int("ORT intra-op threads", self.intra_op_threads, 1, hint="or None for the physical cores")
        check_int("ORT inter-op threads", self.inter_op_threads, 1)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise CatomeError(f"ORT option {f.name} must be true or false, got {value!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "OrtOptions":
        """Options from keyword values (``Runtime.load(..., backend_options=...)``); unknown keys are an error."""
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise CatomeError(f"unknown ONNX Runtime options {unknown}: use {', '.join(sorted(known))}")
        return cls(**values)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise CatomeError("ONNX Runtime is not installed: pip install 'catome-export[ort]' (CPU) or '[ort-gpu]'") \
            from None
    return onnxruntime


def check_gpu_version(version: str) -> None:
    """CatomeError unless ``version`` is onnxruntime-gpu 1.21 or later (DLPack outputs for torch)."""
    got = version_tuple(version)
    if not got or got[:2] < MIN_GPU_VERSION:
        need = ".".join(str(v) for v in MIN_GPU_VERSION)
        raise CatomeError(f"ONNX Runtime's CUDA provider needs onnxruntime-gpu >= {need} (it hands outputs to torch "
                          f"through DLPack), this is {version}: pip install \"onnxruntime-gpu>={need}\", "
                          "or use --backend ort-cpu")


_shared_arena_lock = threading.Lock()
_shared_arena_registered = False


def _register_shared_arena(ort: Any) -> None:
    """Register (once per process) the CPU arena that sessions opting into env allocators share.

    It grows by what is asked (``kSameAsRequested``) rather than by powers of two, and, like any ONNX
    Runtime arena, keeps what it holds until the process ends.
    """
    global _shared_arena_registered
    with _shared_arena_lock:
        if _shared_arena_registered:
            return
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
        except Exception as exc:  # noqa: BLE001 - e.g. the embedding application registered its own already
            logger.debug("shared CPU arena not registered (%s); sessions use the one already there", exc)
        _shared_arena_registered = True


def session_options(options: OrtOptions, device_type: str = "cpu"):
    """An ``onnxruntime.SessionOptions`` from :class:`OrtOptions` for a session on ``device_type``.

    The shared CPU arena is used by CPU sessions only: a CUDA session keeps ONNX Runtime's own
    allocators (its CPU-side buffers are small, and env allocators with the CUDA provider are
    not tested here).
    """
    ort = _import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[options.optimization]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = options.intra_op_threads or physical_cores()
    so.inter_op_num_threads = options.inter_op_threads
    so.enable_mem_pattern = options.mem_pattern
    so.enable_cpu_mem_arena = options.cpu_mem_arena
    if options.cpu_mem_arena and options.shared_arena and device_type == "cpu":
        _register_shared_arena(ort)
        so.add_session_config_entry("session.use_env_allocators", "1")
    so.log_severity_level = options.log_severity
    if not options.allow_spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif options.stop_spinning_after_run:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


class OrtStageRunner:
    """One stage in one ``InferenceSession``."""

    def __init__(self, session: Any, spec: "StageSpec", device: torch.device, options: OrtOptions,
                 stream: DeviceStream | None = None) -> None:
        """``stream``: the backend's stream, the one the session's CUDA provider computes on."""
        self.spec = spec
        self.session = session
        self.device = device
        self.options = options
        self._device_type = "cuda" if device.type == "cuda" else "cpu"
        self._device_id = (device.index or 0) if device.type == "cuda" else 0
        self._in_dtypes = {t.name: torch_dtype(t) for t in spec.inputs}
        self._out_names = [t.name for t in spec.outputs]
        self._empty: dict[tuple[str, tuple[int, ...]], Any] = {}
        self._run_options = None
        if device.type == "cuda" and not options.synchronize:
            self._run_options = _import_ort().RunOptions()
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.stream = stream if stream is not None else DeviceStream(device)
        self.initializers: list[Any] = []
        """Replaced initializers (a refit LoRA's weights) the session reads: kept alive with it."""
        self._check_signature()

    def _check_signature(self) -> None:
        got_in = {i.name for i in self.session.get_inputs()}
        got_out = {o.name for o in self.session.get_outputs()}
        want_in = {t.name for t in self.spec.inputs}
        want_out = set(self._out_names)
        if got_in != want_in or not want_out <= got_out:
            raise CatomeError(
                f"stage {self.spec.index}: the ONNX graph's inputs/outputs do not match the manifest "
                f"(graph inputs {sorted(got_in)}, manifest {sorted(want_in)}): "
                "rebuild the engine with catome-export build"
            )

    def _checked(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        want = self._in_dtypes[name]
        if tensor.dtype != want:
            raise CatomeError(f"stage {self.spec.index} input {name!r} is {tensor.dtype}, the graph expects {want}")
        if tensor.device != self.device:
            raise CatomeError(f"stage {self.spec.index} input {name!r} is on {tensor.device}, "
                              f"the ONNX Runtime session runs on {self.device}")
        return tensor.contiguous()

    def _empty_value(self, name: str, tensor: torch.Tensor) -> Any:
        """An ONNX Runtime value for an empty tensor (torch gives empty tensors a null address)."""
        key = (name, tuple(tensor.shape))
        value = self._empty.get(key)
        if value is None:
            ort = _import_ort()
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                list(tensor.shape), _NUMPY_DTYPES[tensor.dtype], self._device_type, self._device_id
            )
            self._empty[key] = value
        return value

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors = ordered_feeds(self.spec, feeds)
        names = [t.name for t in self.spec.inputs]
        checked = [self._checked(n, t) for n, t in zip(names, tensors)]
        if self.options.io_binding or self.device.type == "cuda":
            outputs = self._run_bound(names, checked)
        else:
            outputs = self._run_numpy(names, checked)
        check_outputs(self.spec, outputs)
        return outputs

    def _run_bound(self, names: list[str], tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        for name, t in zip(names, tensors):
            if t.numel() == 0:
                binding.bind_ortvalue_input(name, self._empty_value(name, t))
            else:
                binding.bind_input(name, self._device_type, self._device_id, _NUMPY_DTYPES[t.dtype],
                                   list(t.shape), t.data_ptr())
        for name in self._out_names:
            binding.bind_output(name, self._device_type, self._device_id)
        with self.stream.ordered():  # the session computes on the backend's stream (its user_compute_stream)
            if self._run_options is not None:
                self.session.run_with_iobinding(binding, self._run_options)
            else:
                self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: _to_torch(v, self._device_type) for name, v in zip(self._out_names, values)}

    def _run_numpy(self, names: list[str], tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = self.session.run(self._out_names, {n: t.numpy() for n, t in zip(names, tensors)})
        return {name: torch.from_numpy(a) for name, a in zip(self._out_names, arrays)}

    def close(self) -> None:
        self._empty.clear()
        self.session = None
        self.initializers = []


def computes_in_fp32(spec: "StageSpec") -> bool:
    """True unless the stage's graph carries fp16 tensors (an fp16 export; its plan weights stay fp32)."""
    return not any(t.dtype == "float16" for t in (*spec.inputs, *spec.outputs))


def check_cuda_session(ort: Any, session: Any, path: Path) -> None:
    """CatomeError, with the fix, unless ``session`` really runs on the CUDA provider.

    ONNX Runtime lists the CUDA provider as available whenever onnxruntime-gpu is installed, but when the
    provider library cannot load (CUDA or cuDNN missing or of another major version) it only logs a warning
    and makes a CPU-only session, whose first CUDA-bound input then fails.
    """
    active = list(session.get_providers())
    if CUDA_PROVIDER in active:
        return
    build = ""
    try:
        from onnxruntime.capi import build_and_package_info as info

        cuda, cudnn = getattr(info, "cuda_version", None), getattr(info, "cudnn_version", None)
        build = f" (CUDA {cuda}, cuDNN {cudnn})" if cuda and cudnn else f" (CUDA {cuda})" if cuda else ""
    except Exception:  # noqa: BLE001 - the versions only make the hint more precise
        build = ""
    preload = (" or call onnxruntime.preload_dlls() before loading the engine to load the ones installed with "
               "torch or the nvidia-* pip packages;" if hasattr(ort, "preload_dlls") else "")
    version = getattr(ort, "__version__", "?")
    raise CatomeError(f"ONNX Runtime could not load its CUDA provider for {path.name} (the session runs on "
                      f"{', '.join(active) or 'no provider'}; ONNX Runtime's warning above names the missing "
                      f"library): install the CUDA and cuDNN major versions onnxruntime-gpu {version} was built "
                      f"for{build} (https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html"
                      f"#requirements),{preload} or use --backend ort-cpu")


def stage_graph_file(stage: StageRecord, options: OrtOptions) -> str:
    """The graph file ONNX Runtime loads for a manifest stage (see :attr:`OrtOptions.fused_graphs`)."""
    if options.fused_graphs and stage.ort_optimized is not None:
        return stage.ort_optimized.file
    return stage.file


def _to_torch(value: Any, device_type: str) -> torch.Tensor:
    """A torch view of an ONNX Runtime output (no copy: numpy view on CPU, DLPack on CUDA)."""
    if device_type == "cpu":
        return torch.from_numpy(value.numpy())
    return torch.from_dlpack(value._get_c_value())


class OrtBackend:
    """Stages as ONNX Runtime sessions on the CPU or one CUDA device."""

    def __init__(self, device: torch.device | str | None = None, options: OrtOptions | None = None) -> None:
        ort = _import_ort()
        dev = torch.device(device if device is not None else "cpu")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        if dev.type not in ("cpu", "cuda"):
            raise CatomeError(f"the ONNX Runtime backend runs on cpu or cuda, not {dev}")
        if dev.type == "cuda":
            check_gpu_version(getattr(ort, "__version__", "unknown"))
            if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
                raise CatomeError("ONNX Runtime's CUDA provider is not usable here: pip install "
                                  "'catome-export[ort-gpu]' on a machine with an NVIDIA GPU, or use --backend ort-cpu")
        self.device = dev
        self.name = "ort-cuda" if dev.type == "cuda" else "ort-cpu"
        self.options = options or OrtOptions()
        self.stream = DeviceStream(dev)
        """CUDA: the stream every session computes on (no stream on the CPU)."""
        self._runners: list[OrtStageRunner] = []
        self.initializer_overrides: Any = None
        """Weights that differ from the graphs' (a refit LoRA; catome_export.lora.refit.InitializerOverrides):
        each session is built from its graph file with them in place of the graph's initializers."""

    def providers(self, fp32: bool = True) -> list[Any]:
        """Execution providers for a session: CUDA on the backend's stream (plus CPU fallback), or CPU.

        ``fp32``: the stage computes in fp32, so TF32 is turned off (``use_tf32=0``); fp16 stages keep the
        provider's default."""
        if self.device.type != "cuda":
            return ["CPUExecutionProvider"]
        cuda_opts = {
            "device_id": str(self.device.index or 0),
            "user_compute_stream": str(self.stream.handle),
            "arena_extend_strategy": "kSameAsRequested",
            "do_copy_in_default_stream": "1",
        }
        if fp32:
            cuda_opts["use_tf32"] = "0"
        return [(CUDA_PROVIDER, cuda_opts), "CPUExecutionProvider"]

    def load_stage(self, engine_dir: Path, stage: "StageRecord") -> OrtStageRunner:
        ort = _import_ort()
        spec = stage.spec
        path = Path(engine_dir) / stage_graph_file(stage, self.options)
        if not path.is_file():
            raise CatomeError(f"stage file {path} is missing: rebuild the engine with catome-export build")
        so = session_options(self.options, self.device.type)
        kept: list[Any] = []
        if self.initializer_overrides is not None:
            for name, array in self.initializer_overrides.for_file(path.name).items():
                value = ort.OrtValue.ortvalue_from_numpy(array)
                kept.append((array, value))  # ONNX Runtime reads them while the session lives
                so.add_initializer(name, value)
        try:
            session = ort.InferenceSession(str(path), sess_options=so,
                                           providers=self.providers(fp32=computes_in_fp32(spec)))
        except Exception as exc:  # ORT raises its own exception types for damaged or unsupported graphs
            raise CatomeError(f"ONNX Runtime cannot load {path} ({type(exc).__name__}: {str(exc)[:300]}); "
                              "rebuild the engine with catome-export build") from None
        if self.device.type == "cuda":
            check_cuda_session(ort, session, path)
        runner = OrtStageRunner(session, spec, self.device, self.options, self.stream)
        runner.initializers = kept
        self._runners.append(runner)
        logger.debug("loaded %s on %s (%s)", path.name, self.name, session.get_providers())
        return runner

    def close(self) -> None:
        for runner in self._runners:
            runner.close()
        self._runners.clear()
