"""TensorRT backend: one deserialised engine per stage, torch tensors bound by address, one stream.

- Each ``stage_<k>.plan`` is deserialised once, with the ``libnvinfer_plugin``
  plugins registered first (the merge's scatter-add runs as a plugin).
- Execution contexts do not own scratch memory: they are created with
  ``ExecutionContextAllocationStrategy.USER_MANAGED`` and all point at one
  shared device buffer as large as the largest stage needs
  (``device_memory_size_v2``). The stages run one after another on one
  stream, so they never use it at the same time.
- Inputs and outputs are torch tensors on the backend's CUDA device, bound
  with ``set_tensor_address``; ``execute_async_v3`` runs on torch's current
  stream, so the work orders with everything torch does and can be captured
  in a CUDA graph (see ``runtime/cuda_graphs.py``).
- ``set_input_shape`` is called only when an input's shape changed since the
  stage's last run; outputs are allocated from ``get_tensor_shape`` after the
  shapes are set.
- Empty tensors (r = 0 gives ``src_idx``/``slot_idx`` of shape [B, 0]) get an
  address of their own in a small dummy allocation: torch returns a null
  pointer for a 0-element tensor, and TensorRT wants at least one allocated
  byte behind every binding (newer releases accept null for empty inputs,
  older ones do not; a real address works for all).

``tensorrt`` is imported when a backend is created, never at module import.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import nullcontext as _nullcontext
from pathlib import Path
from typing import Any

import torch

from catome_export.backends.select import import_tensorrt
from catome_export.errors import CatomeError

logger = logging.getLogger(__name__)

MIN_SCRATCH_BYTES = 512
"""Smallest shared scratch buffer (a valid, aligned address for every context)."""

DUMMY_BYTES = 256
"""Bytes of dummy memory per empty binding (TensorRT's address alignment); each IO tensor gets its own slot."""


def _trt_logger(trt: Any, injected: bool) -> Any:
    """Polygraphy's TensorRT logger (one logger for builder and runtime, routed to its log)."""
    if injected:
        return trt.Logger(trt.Logger.WARNING)
    from polygraphy.backend.trt import util as trt_util

    return trt_util.get_trt_logger()


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    """The torch dtype of a TensorRT ``DataType``."""
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
        trt.DataType.UINT8: torch.uint8,
    }
    for attr, tdt in (("BF16", torch.bfloat16), ("INT64", torch.int64)):
        if hasattr(trt.DataType, attr):
            table[getattr(trt.DataType, attr)] = tdt
    if dtype not in table:
        raise CatomeError(f"TensorRT tensor type {dtype} has no torch equivalent here: rebuild the engines")
    return table[dtype]


class SharedDeviceMemory:
    """One scratch buffer for every execution context of a backend; grows to the largest request.

    ``generation`` changes whenever the buffer is reallocated, so a context
    (or a captured CUDA graph) that points at the old buffer knows to rebind.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffer: torch.Tensor | None = None
        self.generation = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.numel())

    def reserve(self, nbytes: int) -> None:
        """Make the buffer at least ``nbytes`` large (never shrinks)."""
        if nbytes > self.nbytes:
            self.buffer = torch.empty(int(nbytes), dtype=torch.uint8, device=self.device)
            self.generation += 1
            logger.debug("shared TensorRT scratch memory: %.1f MB", nbytes / 2**20)

    @property
    def address(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.data_ptr())

    def release(self) -> None:
        self.buffer = None
        self.generation += 1


def engine_device_memory(engine: Any) -> int:
    """Scratch bytes a context of ``engine`` needs for any shape in its profile."""
    size = getattr(engine, "device_memory_size_v2", None)  # TensorRT >= 10.1
    if size is None:
        size = engine.device_memory_size
    return int(size)


def bind_device_memory(context: Any, address: int, nbytes: int) -> None:
    """Point ``context`` at user-managed scratch memory."""
    if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1: address and size
        context.set_device_memory(address, nbytes)
    else:  # TensorRT 10.0
        context.device_memory = address


class TrtStageRunner:
    """Runs one stage engine: ``run(feeds) -> outputs`` with torch tensors on the backend's device."""

    def __init__(self, backend: "TrtBackend", engine: Any, spec: Any, path: Path) -> None:
        trt = backend.trt
        self.backend = backend
        self.spec = spec
        self.path = path
        self.engine = engine
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise CatomeError(f"TensorRT could not create an execution context for {path.name} "
                              "(out of GPU memory?)")
        self.memory_bytes = engine_device_memory(engine)
        self._memory_generation = -1
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.dtypes: dict[str, torch.dtype] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(name)
            (self.inputs if mode == trt.TensorIOMode.INPUT else self.outputs).append(name)
            self.dtypes[name] = torch_dtype(trt, engine.get_tensor_dtype(name))
        self._check_against_spec()
        io_names = self.inputs + self.outputs
        self._dummy = torch.empty(DUMMY_BYTES * len(io_names), dtype=torch.uint8, device=backend.device)
        self._dummy_slot = {name: i * DUMMY_BYTES for i, name in enumerate(io_names)}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._keep: list[torch.Tensor] = []

    def _check_against_spec(self) -> None:
        """Engine IO must match the spec: same outputs; inputs a subset (TensorRT drops inputs nothing reads)."""
        want_in = {t.name for t in self.spec.inputs}
        want_out = {t.name for t in self.spec.outputs}
        extra = set(self.inputs) - want_in
        if extra or set(self.outputs) != want_out:
            raise CatomeError(
                f"{self.path.name} does not match its stage spec (engine inputs {sorted(self.inputs)}, outputs "
                f"{sorted(self.outputs)}; spec inputs {sorted(want_in)}, outputs {sorted(want_out)}): the plan is "
                "stale, rebuild the engines (catome-export build ... --backend trt)"
            )
        unused = want_in - set(self.inputs)
        if unused:
            logger.debug("stage %d: TensorRT dropped unused inputs %s", self.spec.index, sorted(unused))

    def profile_range(self, name: str) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) of an input in profile 0."""
        return tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if self._shapes.get(name) == shape:
            return
        if not self.context.set_input_shape(name, shape):
            lo, _, hi = self.profile_range(name)
            raise CatomeError(
                f"stage {self.spec.index}: input {name!r} of shape {list(shape)} lies outside the engine's "
                f"profile (min {list(lo)}, max {list(hi)}): use a batch and resolution inside the built range, or "
                "rebuild with wider ranges (catome-export build ... --backend trt)"
            )
        self._shapes[name] = shape

    def _address(self, name: str, t: torch.Tensor) -> int:
        """The tensor's address, or for an empty tensor a valid address of its own in the dummy buffer."""
        if t.numel():
            return int(t.data_ptr())
        return int(self._dummy.data_ptr()) + self._dummy_slot[name]

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bind the feeds, set changed shapes, allocate outputs, enqueue on the current stream."""
        device = self.backend.device
        if device.type == "cuda" and torch.cuda.current_device() != device.index:
            with torch.cuda.device(device):  # TensorRT enqueues on the device its engine was loaded on
                return self._run(feeds)
        return self._run(feeds)

    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        backend = self.backend
        memory = backend.memory
        if self._memory_generation != memory.generation:
            bind_device_memory(self.context, memory.address, memory.nbytes)
            self._memory_generation = memory.generation
        keep: list[torch.Tensor] = []
        for name in self.inputs:
            t = feeds.get(name)
            if t is None:
                raise CatomeError(f"stage {self.spec.index}: input {name!r} was not fed")
            want = self.dtypes[name]
            if t.device != backend.device or t.dtype != want or not t.is_contiguous():
                t = t.to(device=backend.device, dtype=want).contiguous()
            keep.append(t)
            self._set_shape(name, tuple(int(d) for d in t.shape))
            self.context.set_tensor_address(name, self._address(name, t))
        outputs: dict[str, torch.Tensor] = {}
        for name in self.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise CatomeError(f"stage {self.spec.index}: TensorRT cannot size output {name!r} ({list(shape)}): "
                                  "every input shape must be set; rebuild the engines if this persists")
            out = torch.empty(shape, dtype=self.dtypes[name], device=backend.device)
            self.context.set_tensor_address(name, self._address(name, out))
            outputs[name] = out
        if not self.context.execute_async_v3(backend.stream_handle()):
            raise CatomeError(f"TensorRT failed to run stage {self.spec.index} ({self.path.name}): see the TensorRT "
                              "log above")
        # Hold the converted inputs until the next run: the enqueued work still reads them,
        # and no other stream may be handed their memory meanwhile.
        self._keep = keep
        return outputs

    def close(self) -> None:
        self.context = None
        self.engine = None
        self._keep = []
        self._dummy = None  # type: ignore[assignment]


class TrtBackend:
    """The ``Backend`` of the contract for TensorRT engines (``stage_<k>.plan``)."""

    name = "trt"

    def __init__(self, manifest: Any = None, device: torch.device | str | None = None, *,
                 check_compat: bool = True, trt_module: Any = None) -> None:
        """Load nothing yet: check compatibility, register plugins, make the runtime.

        ``trt_module``: a stand-in for the ``tensorrt`` module (tests only;
        it also lets the backend run on a CPU device, where nothing executes).
        """
        self.trt = trt_module if trt_module is not None else import_tensorrt()
        default = "cuda" if trt_module is None or torch.cuda.is_available() else "cpu"
        self.device = torch.device(device if device is not None else default)
        if trt_module is None:
            if not torch.cuda.is_available():
                raise CatomeError("TensorRT needs a CUDA device and a CUDA build of torch; use --backend ort here")
            if self.device.type != "cuda":
                raise CatomeError(f"the TensorRT backend runs on a CUDA device, not {self.device}")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.manifest = manifest
        if manifest is not None and check_compat:
            from catome_export.backends.trt_compat import TrtRuntimeInfo, check_trt_compat

            check_trt_compat(manifest, TrtRuntimeInfo.detect(self.device))
        self.logger = _trt_logger(self.trt, injected=trt_module is not None)
        self.trt.init_libnvinfer_plugins(self.logger, "")
        self.runtime = self.trt.Runtime(self.logger)
        self.memory = SharedDeviceMemory(self.device)
        self.runners: list[TrtStageRunner] = []

    def stream_handle(self) -> int:
        """The CUDA stream TensorRT enqueues on: torch's current stream (0 on a CPU test device)."""
        if self.device.type != "cuda":
            return 0
        return int(torch.cuda.current_stream(self.device).cuda_stream)

    def load_stage(self, engine_dir: Path, entry: Mapping[str, Any], spec: Any) -> TrtStageRunner:
        """Deserialise ``entry``'s plan (``entry["engine"]["file"]``, default ``stage_<k>.plan``)."""
        engine_dir = Path(engine_dir)
        engine = entry.get("engine")
        name = engine.get("file") if isinstance(engine, Mapping) else engine if isinstance(engine, str) else None
        path = engine_dir / (name or f"stage_{spec.index}.plan")
        if not path.is_file():
            raise CatomeError(f"{path} is missing: build the TensorRT engines (catome-export build ... --backend trt)"
                              " or load the folder with --backend ort")
        with torch.cuda.device(self.device) if self.device.type == "cuda" else _nullcontext():
            cuda_engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if cuda_engine is None:
                raise CatomeError(f"TensorRT could not load {path} (built by another TensorRT version or for "
                                  "another GPU?): rebuild the engines on this machine "
                                  "(catome-export build ... --backend trt)")
            runner = TrtStageRunner(self, cuda_engine, spec, path)
            # never bind a null scratch address, even for an engine that needs none
            self.memory.reserve(max(runner.memory_bytes, MIN_SCRATCH_BYTES))
        self.runners.append(runner)
        return runner

    def close(self) -> None:
        for runner in self.runners:
            runner.close()
        self.runners = []
        self.memory.release()


def create(manifest: Any = None, device: torch.device | str | None = None) -> TrtBackend:
    """Factory used by ``create_backend`` for the ``trt`` choice."""
    return TrtBackend(manifest, device)
