"""The backend interface: one small protocol that TensorRT, ONNX Runtime and eager torch implement.

A :class:`Backend` loads the stages of an engine folder once; each stage
becomes a :class:`StageRunner` that takes a ``name -> torch.Tensor`` dict of
its inputs (on the backend's device) and returns a ``name -> torch.Tensor``
dict of its outputs (on the same device). The runtime walks the chain of
runners and never sees a backend-specific type.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, ContextManager, Mapping, Protocol, runtime_checkable

import torch

from catome_export.dtypes import ELEMENT_TYPES
from catome_export.errors import CatomeError

if TYPE_CHECKING:  # the export layer imports torch modules; keep this import for type checkers only
    from catome_export.engine.manifest import StageRecord
    from catome_export.engine.specs import StageSpec, TensorSpec

TORCH_DTYPES: dict[str, torch.dtype] = ELEMENT_TYPES
"""Manifest dtype names -> torch dtypes."""


@runtime_checkable
class StageRunner(Protocol):
    """One loaded stage: runs its graph on torch tensors of the backend's device."""

    spec: "StageSpec"

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the stage on ``feeds`` (every name of ``spec.inputs``); returns every output of ``spec.outputs``."""
        ...

    def close(self) -> None:
        """Release what the stage holds (sessions, engines, contexts)."""
        ...


@runtime_checkable
class ForkableStageRunner(StageRunner, Protocol):
    """A stage runner that holds execution state between runs (a TensorRT execution context: input shapes and
    tensor addresses), which a captured CUDA graph bakes in.

    ``fork()`` gives another runner of the same stage with execution state of its own, so a captured graph can
    own its state while eager runs use the original (see :mod:`catome_export.runtime.cuda_graphs`). A runner
    without such state (eager torch modules) need not implement it: one instance serves every caller.
    """

    def fork(self) -> StageRunner:
        """Another runner of the same stage, sharing what is read-only (engine, weights, scratch memory) and
        owning its execution state; ``close()`` releases only that state."""
        ...


class DeviceStream:
    """The CUDA stream a backend enqueues its work on, created and owned by the backend.

    Never the legacy default stream (which ``torch.cuda.current_stream()``
    is unless the caller set another): TensorRT's ``enqueueV3`` on it adds
    device-wide synchronisations, and ONNX Runtime takes a null
    ``user_compute_stream`` as "none given" and uses a stream of its own.

    :meth:`ordered` puts the backend's work in order with the caller's
    current stream: this stream first waits for everything the caller
    enqueued (the inputs it produced), and afterwards the caller's stream
    waits for this one (the outputs handed back). Memory allocated on the
    caller's stream and read here is therefore only reused by the caller's
    later work, which runs after ours; memory allocated on this stream and
    handed to the caller must be marked with ``record_stream`` by whoever
    hands it over (:class:`catome_export.runtime.runtime.Runtime` does for
    ``noise_pred``).

    On a CPU device there is no stream: work happens when it is called,
    ordering is a no-op, and :attr:`handle` is an opaque non-zero token
    (seen only by a stand-in ``tensorrt`` module, which tests drive on the
    CPU).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream: torch.cuda.Stream | None = None
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
        elif device.type != "cpu":
            raise CatomeError(f"no stream for device {device}: use cpu or cuda")

    @property
    def handle(self) -> int:
        """The ``cudaStream_t`` as an int (TensorRT's ``execute_async_v3``, ONNX Runtime's ``user_compute_stream``)."""
        if self.stream is None:
            return id(self)
        return int(self.stream.cuda_stream)

    def is_current(self) -> bool:
        """True when this stream is the caller's current stream (the runtime made it so for a whole step)."""
        return self.stream is not None and torch.cuda.current_stream(self.device) == self.stream

    @contextmanager
    def ordered(self) -> Iterator[None]:
        """Enqueue the body's work on this stream in order with the caller's current stream (see the class)."""
        if self.stream is None or self.is_current():
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        try:
            yield
        finally:
            caller.wait_stream(self.stream)

    def synchronize(self) -> None:
        """Wait until everything enqueued on this stream has finished (before freeing memory or state it uses)."""
        if self.stream is not None:
            self.stream.synchronize()

    def allocating(self) -> ContextManager[object]:
        """Make this stream current, so buffers the backend keeps for its own work (scratch memory) belong to it."""
        if self.stream is None:
            return nullcontext()
        return torch.cuda.stream(self.stream)


@runtime_checkable
class StreamOwner(Protocol):
    """A backend whose work runs on a stream of its own (TensorRT, ONNX Runtime CUDA)."""

    stream: DeviceStream


@runtime_checkable
class Backend(Protocol):
    """A way to run stages: ``trt``, ``ort-cpu``, ``ort-cuda`` or ``torch``."""

    name: str
    device: torch.device

    def load_stage(self, engine_dir: Path, stage: "StageRecord") -> StageRunner:
        """Load ``stage`` (its spec and files, from the manifest) of ``engine_dir``."""
        ...

    def close(self) -> None:
        """Release every stage this backend loaded."""
        ...


def torch_dtype(spec: "TensorSpec") -> torch.dtype:
    """The torch dtype of a tensor spec, or CatomeError for a dtype the runtime does not know."""
    try:
        return TORCH_DTYPES[spec.dtype]
    except KeyError:
        raise CatomeError(
            f"tensor {spec.name!r} has dtype {spec.dtype!r}, which this version cannot run "
            f"(known: {', '.join(TORCH_DTYPES)}); rebuild the engine with this version of catome-export"
        ) from None


def ordered_feeds(spec: "StageSpec", feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The stage's inputs in ``spec.inputs`` order; CatomeError naming any missing input."""
    missing = [t.name for t in spec.inputs if t.name not in feeds]
    if missing:
        raise CatomeError(f"stage {spec.index} is missing inputs {missing}: the engine's stage chain is inconsistent; "
                          "rebuild it with catome-export build")
    return [feeds[t.name] for t in spec.inputs]


def check_outputs(spec: "StageSpec", outputs: Mapping[str, torch.Tensor]) -> None:
    """CatomeError when a stage did not return every output its spec lists."""
    missing = [t.name for t in spec.outputs if t.name not in outputs]
    if missing:
        raise CatomeError(f"stage {spec.index} did not return outputs {missing}: rebuild the engine")
