"""What a benchmark times: one object per backend with the same small interface.

A :class:`Target` is configured with merge settings (or None), told when a
new generation starts (so the next call is a checkpoint: empty caches,
matching runs), called like a U-Net, and asked what its last call did
(controller time, r per site, per-stage times where it has stages).

Controller time is measured around ``MergeController.plan_for`` (matching on
checkpoint steps, the cache look-up otherwise): the runtime records it per
step; for the eager patch a thin timing proxy stands in for the handle's
controller. On CUDA the proxy synchronises before and after each call so the
time is the controller's own, not the queued kernels' before it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from catome_export.bench.timing import synchronize
from catome_export.errors import CatomeError
from catome_export.engine.engine import Engine, EngineSource
from catome_export.engine.io_names import MODEL_OUTPUT, SAMPLE, TEXT, TIMESTEP
from catome_export.merging import MergePlan, MergeSettings

logger = logging.getLogger(__name__)


@dataclass
class CallStats:
    """What the last call of a target did."""

    controller_ms: float = 0.0
    """Time in the merge controller (matching or cache look-up), all sites together."""
    merged: dict[int, int] = field(default_factory=dict)
    """Site -> r of the call."""
    matched: dict[int, bool] = field(default_factory=dict)
    """Site -> whether matching ran."""
    stage_ms: list[float] | None = None
    """Per-stage wall times (engines with stage timing on)."""


def _added(added: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """``added_cond_kwargs`` of a call: SDXL-style models' ``text_embeds`` and ``time_ids``, None for SD 1.x/2.x."""
    return None if added is None else dict(added)


class Target:
    """A U-Net-like thing to time (base class; see the concrete targets below)."""

    name = "target"
    merges = False
    """Whether :meth:`configure` takes merge settings."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def configure(self, settings: MergeSettings | None) -> None:
        if settings is not None and not self.merges:
            raise CatomeError(f"backend {self.name} does not merge tokens")

    def new_generation(self) -> None:
        """The next call is loop index 0 (empty caches: matching runs)."""

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 added: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One U-Net call; ``added``: the SDXL-style added conditioning (``text_embeds``, ``time_ids``) or None."""
        raise NotImplementedError

    def last_call(self) -> CallStats:
        return CallStats()

    def suspend(self) -> None:
        """Step aside for another target on the same model (the eager patch comes off until the next configure)."""

    def close(self) -> None:
        """Release what the target holds (patches, sessions)."""


class EagerTarget(Target):
    """The plain diffusers U-Net."""

    name = "eager"

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__(next(unet.parameters()).device)
        self.unet = unet

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 added: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        with torch.inference_mode():
            return self.unet(sample, timestep, text, added_cond_kwargs=_added(added), return_dict=False)[0]


class _TimedController:
    """Delegates to a MergeController and adds up the time of its ``plan_for`` calls."""

    def __init__(self, inner: Any, device: torch.device) -> None:
        self._inner = inner
        self._device = device
        self.spent_ms = 0.0

    def plan_for(self, site: int, x: torch.Tensor, grid: tuple[int, int]) -> MergePlan:
        synchronize(self._device)
        start = time.perf_counter()
        plan = self._inner.plan_for(site, x, grid)
        synchronize(self._device)
        self.spent_ms += (time.perf_counter() - start) * 1e3
        return plan

    def begin_step(self, timestep: float | None = None) -> int:
        self.spent_ms = 0.0
        return self._inner.begin_step(timestep)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class EagerMergeTarget(Target):
    """The eager patch (``apply_merging``) on the U-Net: ``eager-tome`` or ``eager-catome``."""

    merges = True

    def __init__(self, unet: torch.nn.Module, name: str) -> None:
        super().__init__(next(unet.parameters()).device)
        self.unet = unet
        self.name = name
        self.handle: Any = None
        self._timer: _TimedController | None = None

    def configure(self, settings: MergeSettings | None) -> None:
        from catome_export.eager import apply_merging

        if settings is None:
            raise CatomeError(f"backend {self.name} needs merge settings")
        self.close()
        self.handle = apply_merging(self.unet, settings)
        self._timer = _TimedController(self.handle.controller, self.device)
        self.handle.controller = self._timer

    def new_generation(self) -> None:
        self._require().reset()

    def _require(self) -> Any:
        if self.handle is None:
            raise CatomeError(f"backend {self.name} was not configured with merge settings")
        return self.handle

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 added: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        self._require()
        with torch.inference_mode():
            return self.unet(sample, timestep, text, added_cond_kwargs=_added(added), return_dict=False)[0]

    def last_call(self) -> CallStats:
        handle = self._require()
        last = handle.history[-1] if handle.history else None
        spent = self._timer.spent_ms if self._timer is not None else 0.0
        if last is None:
            return CallStats(spent)
        return CallStats(spent, dict(last.merged), dict(last.matched))

    def suspend(self) -> None:
        self.close()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
            self._timer = None


class _TimedRunner:
    """A stage runner proxy that records the wall time of each ``run``."""

    def __init__(self, inner: Any, device: torch.device, out: list[float]) -> None:
        self._inner = inner
        self.spec = inner.spec
        self._device = device
        self._out = out

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        outputs = self._inner.run(feeds)
        synchronize(self._device)
        self._out.append((time.perf_counter() - start) * 1e3)
        return outputs

    def close(self) -> None:
        self._inner.close()


class EngineTarget(Target):
    """The staged engine through the runtime (``runtime.unet``, as a pipeline calls it)."""

    name = "engine"
    merges = True

    def __init__(self, runtime: Any, stage_timings: bool = True) -> None:
        super().__init__(runtime.device)
        self.runtime = runtime
        self._stage_ms: list[float] = []
        self._stage_timings = stage_timings
        if stage_timings:
            chain = runtime.chain
            chain.runners = [_TimedRunner(r, runtime.device, self._stage_ms) for r in chain.runners]

    @classmethod
    def load(cls, engine: EngineSource, backend: str, device: str, ort_options: Mapping[str, Any],
             stage_timings: bool = True) -> "EngineTarget":
        """Load the engine (opened here when given as a folder); ``ort_options`` (threads included) go to ONNX
        Runtime backends only."""
        from catome_export.backends.select import choose_backend
        from catome_export.runtime import Runtime

        opened = Engine.open(engine)
        engine_backend = opened.manifest.engine_backend
        choice = choose_backend(backend, engine_backend=engine_backend, device=device).name  # as Runtime.load picks
        options = dict(ort_options) if choice.startswith("ort") else None
        runtime = Runtime.load(opened, backend=choice, device=device, backend_options=options)
        logger.info("engine %s on %s", opened.path, runtime.backend.name)
        return cls(runtime, stage_timings)

    @property
    def backend_name(self) -> str:
        return self.runtime.backend.name

    @property
    def base_settings(self) -> MergeSettings:
        return self.runtime.settings

    def configure(self, settings: MergeSettings | None) -> None:
        if settings is None:
            raise CatomeError("the engine needs merge settings (merge fraction 0 for no merging)")
        self.runtime.set_settings(settings)

    def new_generation(self) -> None:
        self.runtime.reset()

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 added: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        self._stage_ms.clear()
        return self.runtime.unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=_added(added),
                                 return_dict=False)[0]

    def last_call(self) -> CallStats:
        history = self.runtime.history
        rec = history[-1] if history else None
        stages = list(self._stage_ms) if self._stage_timings else None
        if rec is None:
            return CallStats(stage_ms=stages)
        return CallStats(rec.controller_ms, dict(rec.merged), dict(rec.matched), stages)

    def close(self) -> None:
        self.runtime.close()


class UnstagedTarget(Target):
    """One un-cut ONNX graph of the U-Net in ONNX Runtime, with the engine's session options."""

    name = "engine-unstaged"

    def __init__(self, runner: Any, backend: Any) -> None:
        super().__init__(backend.device)
        self.runner = runner
        self.backend = backend

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 added: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        feeds = {SAMPLE: sample, TIMESTEP: timestep, TEXT: text, **(added or {})}
        return self.runner.run(feeds)[MODEL_OUTPUT]

    def close(self) -> None:
        self.backend.close()
