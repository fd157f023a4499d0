"""TensorRT backend: one deserialised engine per stage, torch tensors bound by address, one stream of its own.

- Each ``stage_<k>.plan`` is deserialised once, with the ``libnvinfer_plugin``
  plugins registered first (the merge's scatter-add runs as a plugin).
- Execution contexts do not own scratch memory: they are created with
  ``ExecutionContextAllocationStrategy.USER_MANAGED`` and all point at one
  shared device buffer as large as the largest stage needs
  (``device_memory_size_v2``), set before their first enqueue. Every context
  of a backend enqueues on the backend's one stream, so two contexts never
  use that buffer at the same time. The buffer is replaced or freed, and a
  context destroyed, only after that stream has finished its work.
- The backend owns its CUDA stream (:class:`~catome_export.backends.base.DeviceStream`,
  never the legacy default stream): ``execute_async_v3`` runs on it, after
  the caller's current stream (which produced the inputs), and the caller's
  stream waits for it before it reads the outputs.
- Inputs and outputs are torch tensors on the backend's device, bound with
  ``set_tensor_address`` (its result is checked). Every address is 256-byte
  aligned, as TensorRT requires: an input that is not (a view at an odd
  offset) is copied into an aligned buffer first; outputs are allocated
  aligned. A zero-volume tensor (torch gives it a null address) is bound to
  a slot of its own in a small aligned dummy buffer: TensorRT wants a
  non-null address for every input, empty or not.
- ``set_input_shape`` is called only when an input's shape changed since the
  context's last run; outputs are allocated from ``get_tensor_shape`` after
  all input shapes are set.
- :meth:`TrtStageRunner.fork` gives a runner with an execution context of
  its own on the same engine and scratch memory: each captured CUDA graph
  owns such contexts, so no eager run ever re-shapes or re-enqueues a
  context a graph was captured on (see ``runtime/cuda_graphs.py``).

``tensorrt`` is imported when a backend is created, never at module import.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import nullcontext as _nullcontext
from pathlib import Path
from typing import Any

import torch

from catome_export.backends.base import DeviceStream
from catome_export.backends.select import import_tensorrt, require_polygraphy
from catome_export.errors import CatomeError
from catome_export.engine.manifest import Manifest, StageRecord

logger = logging.getLogger(__name__)

ALIGNMENT = 256
"""Bytes every tensor address (and the scratch memory) must be aligned to (``IExecutionContext::setTensorAddress``)."""

MIN_SCRATCH_BYTES = 512
"""Smallest shared scratch buffer (a valid, aligned address for every context)."""

DUMMY_BYTES = ALIGNMENT
"""Bytes of dummy memory per zero-volume binding; each IO tensor gets its own aligned slot."""


def _trt_logger(trt: Any, injected: bool) -> Any:
    """Polygraphy's TensorRT logger (one logger for builder and runtime, routed to its log)."""
    if injected:
        return trt.Logger(trt.Logger.WARNING)
    require_polygraphy()
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


def is_aligned(t: torch.Tensor) -> bool:
    """True when ``t``'s address is a multiple of :data:`ALIGNMENT`."""
    return int(t.data_ptr()) % ALIGNMENT == 0


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor whose address is 256-byte aligned (zero-volume: whatever torch gives).

    torch's CUDA caching allocator hands out 512-byte aligned blocks, so the
    first allocation is kept there; elsewhere (the CPU allocator aligns to 64
    bytes) a slightly larger byte buffer is cut at the next aligned offset.
    """
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.numel() == 0 or is_aligned(t):
        return t
    nbytes = t.numel() * t.element_size()
    del t
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
    offset = (-int(raw.data_ptr())) % ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).view(shape)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its address is aligned (or it is empty), else an aligned copy (on the current stream)."""
    if t.numel() == 0 or is_aligned(t):
        return t
    out = aligned_empty(tuple(t.shape), t.dtype, t.device)
    out.copy_(t)
    return out


class SharedDeviceMemory:
    """One aligned scratch buffer for every execution context of a backend; grows to the largest request.

    ``generation`` changes whenever the buffer is reallocated, so a context
    (or a captured CUDA graph) that points at the old buffer knows to rebind.
    The buffer is allocated on the backend's stream, the only one that uses
    it, so the allocator never hands its memory to other work too early; an
    old buffer is dropped only after that stream has finished with it.
    """

    def __init__(self, device: torch.device, stream: DeviceStream | None = None) -> None:
        self.device = device
        self.stream = stream
        self.buffer: torch.Tensor | None = None
        self.generation = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.numel())

    def reserve(self, nbytes: int) -> None:
        """Make the buffer at least ``nbytes`` large (never shrinks)."""
        if nbytes > self.nbytes:
            self._settle()
            with self.stream.allocating() if self.stream is not None else _nullcontext():
                self.buffer = aligned_empty((int(nbytes),), torch.uint8, self.device)
            self.generation += 1
            logger.debug("shared TensorRT scratch memory: %.1f MB", nbytes / 2**20)

    @property
    def address(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.data_ptr())

    def _settle(self) -> None:
        """Wait until no enqueued work can still use the buffer, before it is dropped."""
        if self.buffer is not None and self.stream is not None:
            self.stream.synchronize()

    def release(self) -> None:
        self._settle()
        self.buffer = None
        self.generation += 1


def engine_device_memory(engine: Any) -> int:
    """Scratch bytes a context of ``engine`` needs for any shape in its profile (``device_memory_size_v2``,
    TensorRT 10.1 and later, the oldest release this project supports)."""
    return int(engine.device_memory_size_v2)


def bind_device_memory(context: Any, address: int, nbytes: int) -> None:
    """Point ``context`` at user-managed scratch memory (``set_device_memory(ptr, size)``, 10.1 and later)."""
    context.set_device_memory(address, nbytes)


class TrtStageRunner:
    """Runs one stage engine on one execution context: ``run(feeds) -> outputs`` with torch tensors.

    The runners :meth:`TrtBackend.load_stage` returns serve eager runs;
    :meth:`fork` makes further runners of the same engine, each with a
    context of its own, for captured CUDA graphs.
    """

    def __init__(self, backend: "TrtBackend", engine: Any, spec: Any, path: Path,
                 parent: "TrtStageRunner | None" = None) -> None:
        trt = backend.trt
        self.backend = backend
        self.spec = spec
        self.path = path
        self.engine = engine
        self.parent = parent
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
        with backend.stream.allocating():
            self._dummy = aligned_empty((DUMMY_BYTES * len(io_names),), torch.uint8, backend.device)
        self._dummy_slot = {name: i * DUMMY_BYTES for i, name in enumerate(io_names)}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._keep: list[torch.Tensor] = []
        self.runs = 0
        """Enqueues on this runner's context so far."""

    def _check_against_spec(self) -> None:
        """Engine IO must match the spec: same outputs; inputs a subset (TensorRT drops inputs nothing reads)."""
        want_in = {t.name for t in self.spec.inputs}
        want_out = {t.name for t in self.spec.outputs}
        extra = set(self.inputs) - want_in
        if extra or set(self.outputs) != want_out:
            raise CatomeError(
                f"{self.path.name} does not match its stage spec (engine inputs {sorted(self.inputs)}, outputs "
                f"{sorted(self.outputs)}; spec inputs {sorted(want_in)}, outputs {sorted(want_out)}): the plan is "
                "stale, rebuild the engines (catome-export build ... --engine-kind trt)"
            )
        unused = want_in - set(self.inputs)
        if unused and self.parent is None:
            logger.debug("stage %d: TensorRT dropped unused inputs %s", self.spec.index, sorted(unused))

    def fork(self) -> "TrtStageRunner":
        """Another runner of this stage with an execution context of its own.

        It shares the engine and the backend's scratch memory (the backend's
        one stream orders every context's work, so they never use it at the
        same time) and keeps its own input shapes and tensor addresses. A
        captured CUDA graph owns forks, so eager runs never touch a context
        a graph was captured on. ``close()`` releases the fork's context.
        """
        if self.context is None:
            raise CatomeError(f"stage {self.spec.index} was closed: load the engine again")
        return self.backend.fork(self)

    def profile_range(self, name: str) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) of an input in profile 0."""
        return tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if self._shapes.get(name) == shape:
            return
        self._shapes.pop(name, None)
        if not self.context.set_input_shape(name, shape):
            lo, _, hi = self.profile_range(name)
            raise CatomeError(
                f"stage {self.spec.index}: input {name!r} of shape {list(shape)} lies outside the engine's "
                f"profile (min {list(lo)}, max {list(hi)}): use a batch and resolution inside the built range, or "
                "rebuild with wider ranges (catome-export build ... --engine-kind trt)"
            )
        self._shapes[name] = shape

    def _bind(self, name: str, t: torch.Tensor) -> None:
        """Bind ``t`` (aligned, or empty) to ``name``; an empty tensor gets its slot of the dummy buffer."""
        address = int(t.data_ptr()) if t.numel() else int(self._dummy.data_ptr()) + self._dummy_slot[name]
        if not self.context.set_tensor_address(name, address):
            raise CatomeError(f"TensorRT refused address {address:#x} for tensor {name!r} of stage "
                              f"{self.spec.index} ({self.path.name}; it needs a non-null, {ALIGNMENT}-byte aligned "
                              "address of a known tensor): see the TensorRT log above; if the plan's tensor names "
                              "changed, rebuild the engines (catome-export build ... --engine-kind trt)")

    def _bind_memory(self) -> None:
        memory = self.backend.memory
        if self._memory_generation != memory.generation:
            if memory.nbytes < self.memory_bytes or memory.address == 0:
                raise CatomeError(f"internal: stage {self.spec.index} needs {self.memory_bytes} bytes of scratch "
                                  f"memory, the shared buffer has {memory.nbytes}")
            bind_device_memory(self.context, memory.address, memory.nbytes)
            self._memory_generation = memory.generation

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bind the feeds, set changed shapes, allocate outputs, enqueue on the backend's stream."""
        if self.context is None:
            raise CatomeError(f"stage {self.spec.index} was closed: load the engine again")
        device = self.backend.device
        if device.type == "cuda" and torch.cuda.current_device() != device.index:
            with torch.cuda.device(device):  # TensorRT enqueues on the device its engine was loaded on
                return self._run(feeds)
        return self._run(feeds)

    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        backend = self.backend
        self._bind_memory()
        keep: list[torch.Tensor] = []
        # Conversions and copies run on the caller's stream, after the work that produced the feeds.
        for name in self.inputs:
            t = feeds.get(name)
            if t is None:
                raise CatomeError(f"stage {self.spec.index}: input {name!r} was not fed")
            want = self.dtypes[name]
            if t.device != backend.device or t.dtype != want or not t.is_contiguous():
                t = t.to(device=backend.device, dtype=want).contiguous()
            t = aligned(t)
            keep.append(t)
            self._set_shape(name, tuple(int(d) for d in t.shape))
            self._bind(name, t)
        outputs: dict[str, torch.Tensor] = {}
        for name in self.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise CatomeError(f"stage {self.spec.index}: TensorRT cannot size output {name!r} ({list(shape)}): "
                                  "every input shape must be set; rebuild the engines if this persists")
            out = aligned_empty(shape, self.dtypes[name], backend.device)
            self._bind(name, out)
            outputs[name] = out
        with backend.stream.ordered():
            ok = self.context.execute_async_v3(backend.stream.handle)
        self.runs += 1
        if not ok:
            raise CatomeError(f"TensorRT failed to run stage {self.spec.index} ({self.path.name}): see the TensorRT "
                              "log above")
        # Hold the converted inputs until the next run: the enqueued work still reads them.
        self._keep = keep
        return outputs

    def close(self) -> None:
        """Release the context, once the backend's stream finished the work enqueued on it; a runner
        :meth:`TrtBackend.load_stage` returned also releases its forks."""
        if self.context is not None:
            self.backend.stream.synchronize()
        if self.parent is None:
            for fork in [f for f in self.backend.forks if f.parent is self]:
                fork.close()
        self.backend.forget(self)
        self.context = None
        self.engine = None
        self._keep = []
        self._dummy = None  # type: ignore[assignment]


class TrtBackend:
    """The ``Backend`` of the contract for TensorRT engines (``stage_<k>.plan``)."""

    name = "trt"

    def __init__(self, manifest: Manifest | None = None, device: torch.device | str | None = None, *,
                 check_compat: bool = True, trt_module: Any = None) -> None:
        """Load nothing yet: check compatibility, register plugins, make the runtime and the stream.

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
        self.stream = DeviceStream(self.device)
        """The stream every context of this backend enqueues on."""
        self.memory = SharedDeviceMemory(self.device, self.stream)
        self.runners: list[TrtStageRunner] = []
        """The runners :meth:`load_stage` returned (eager runs), in load order."""
        self.forks: list[TrtStageRunner] = []
        """Runners made by :meth:`TrtStageRunner.fork` and not closed yet."""
        self.initializer_overrides: Any = None
        """Weights that differ from the graphs' (a refit LoRA; catome_export.lora.refit.InitializerOverrides),
        refit into weight-stripped plans at load."""

    def load_stage(self, engine_dir: Path, stage: StageRecord) -> TrtStageRunner:
        """Deserialise ``stage``'s plan (its engine file, default ``stage_<k>.plan``)."""
        engine_dir = Path(engine_dir)
        spec = stage.spec
        path = engine_dir / (stage.engine.file if stage.engine is not None else f"stage_{spec.index}.plan")
        if not path.is_file():
            raise CatomeError(f"{path} is missing: build the TensorRT engines (catome-export build ... --engine-kind trt)"
                              " or load the folder with --backend ort")
        with self._on_device():
            cuda_engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if cuda_engine is None:
                raise CatomeError(f"TensorRT could not load {path} (built by another TensorRT version or for "
                                  "another GPU?): rebuild the engines on this machine "
                                  "(catome-export build ... --engine-kind trt)")
            runner = TrtStageRunner(self, cuda_engine, spec, path)
            if self.manifest is not None and self.manifest.lora is not None and self.manifest.lora.stripped:
                # a weight-stripped plan: its weights come from the stage graph, and a refit LoRA's from the
                # overrides (TensorRT names refittable weights after the graph's initializers)
                overrides = {} if self.initializer_overrides is None else \
                    self.initializer_overrides.for_file(stage.file)
                self.refit_stage(runner, overrides, onnx_path=engine_dir / stage.file)
            # never bind a null scratch address, even for an engine that needs none
            self.memory.reserve(max(runner.memory_bytes, MIN_SCRATCH_BYTES))
        self.runners.append(runner)
        return runner

    def refit_stage(self, runner: TrtStageRunner, weights: Mapping[str, Any], *,
                    onnx_path: Path | None = None) -> None:
        """Refit ``runner``'s engine (built refittable) with ``weights`` (ONNX initializer name -> array in the
        graph's layout), after every weight of ``onnx_path`` where given (a weight-stripped plan): the TensorRT
        Refitter, ``set_named_weights`` then ``refit_cuda_engine``. Forks share the engine, so they see it too."""
        import numpy as np

        trt = self.trt
        self.stream.synchronize()  # no work of the engine may be pending while it is refit
        where = runner.path.name
        with self._on_device():
            if not getattr(runner.engine, "refittable", False):
                raise CatomeError(f"{where} was built without --refittable: its weights cannot be swapped; rebuild "
                                  "the engine with catome-export build ... --backend trt --refittable")
            try:
                refitter = trt.Refitter(runner.engine, self.logger)
            except TypeError as exc:
                raise CatomeError(f"TensorRT cannot refit {where} ({exc}): rebuild the engine with --refittable") \
                    from None
            if onnx_path is not None:
                parser = trt.OnnxParserRefitter(refitter, self.logger)
                if not parser.refit_from_file(str(onnx_path)):
                    errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                    raise CatomeError(f"TensorRT could not take the weights of {onnx_path.name} for {where} "
                                      f"({errors or 'see the TensorRT messages above'}): rebuild the engine")
            kept = []  # TensorRT reads the arrays until refit_cuda_engine returns
            for name, array in weights.items():
                data = np.ascontiguousarray(array)
                kept.append(data)
                if not refitter.set_named_weights(name, trt.Weights(data)):
                    raise CatomeError(f"TensorRT refused the new weights {name} of {where} (see its message above): "
                                      "the LoRA's weights do not fit the engine; rebuild it")
            missing = list(refitter.get_missing_weights())
            if missing:
                raise CatomeError(f"TensorRT needs {len(missing)} more weights to refit {where} (e.g. {missing[0]}): "
                                  "rebuild the engine with --refittable")
            if not refitter.refit_cuda_engine():
                raise CatomeError(f"TensorRT could not refit {where} (see its message above); the engine may hold "
                                  "some new weights: load the engine again")
            del kept

    def fork(self, runner: TrtStageRunner) -> TrtStageRunner:
        """A runner of ``runner``'s engine with a context of its own (see :meth:`TrtStageRunner.fork`)."""
        with self._on_device():
            fork = TrtStageRunner(self, runner.engine, runner.spec, runner.path, parent=runner)
        self.forks.append(fork)
        return fork

    def forget(self, runner: TrtStageRunner) -> None:
        """Drop a closed runner from the backend's lists."""
        self.forks = [r for r in self.forks if r is not runner]

    def _on_device(self) -> Any:
        return torch.cuda.device(self.device) if self.device.type == "cuda" else _nullcontext()

    def close(self) -> None:
        for runner in self.forks + self.runners:
            runner.close()
        self.runners = []
        self.forks = []
        self.memory.release()


def create(manifest: Manifest | None = None, device: torch.device | str | None = None) -> TrtBackend:
    """Factory used by ``create_backend`` for the ``trt`` choice."""
    return TrtBackend(manifest, device)
