"""Embedding a loaded engine in a diffusers pipeline: :func:`attach` and :meth:`Attachment.detach`.

``attach(pipe, runtime)`` puts ``runtime.unet`` in place of ``pipe.unet`` and
makes every ``pipe(...)`` call start a new generation on the runtime (step 0,
empty plan caches), by the mechanism the eager patch uses: diffusers
pipelines call their ``progress_bar`` method exactly once per call, right
before the denoising loop, and a wrapper on the instance resets the runtime
there. ``detach()`` puts the original U-Net and ``progress_bar`` back.

Threads: a :class:`~catome_export.runtime.Runtime` holds one controller state
(step counter, per-site plan caches, history), so a generation belongs to one
thread at a time (:mod:`catome_export.runtime.ownership`). A pipeline call
holds the runtime from the progress bar that opens its denoising loop to that
bar's close; another thread's pipeline call (or ``reset``, ``set_step``, U-Net
call) waits for it, and nothing is mixed. A runtime may be attached to several
pipelines (one per thread; a pipeline's scheduler is not thread-safe), whose
generations then take turns; for throughput, load one runtime per thread.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from catome_export.errors import CatomeError
from catome_export.merging.steps import ResetOnCall, StepRecord

logger = logging.getLogger(__name__)

_BY_PIPE: "weakref.WeakKeyDictionary[Any, Attachment]" = weakref.WeakKeyDictionary()
"""Pipelines that carry an attached runtime now."""



def _registered(registry: "weakref.WeakKeyDictionary[Any, Attachment]", key: Any) -> "Attachment | None":
    try:
        return registry.get(key)
    except TypeError:  # an object that takes no weak reference is never registered
        return None


def _register(registry: "weakref.WeakKeyDictionary[Any, Attachment]", key: Any, value: "Attachment") -> None:
    try:
        registry[key] = value
    except TypeError:
        logger.debug("%s takes no weak reference: attaching it twice is not detected", type(key).__name__)


def _unregister(registry: "weakref.WeakKeyDictionary[Any, Attachment]", key: Any, value: "Attachment") -> None:
    if _registered(registry, key) is value:
        del registry[key]


_CHECKED_CONFIG = ("in_channels", "out_channels", "cross_attention_dim")
"""U-Net config keys that must agree between the pipeline's own U-Net and the engine."""


class _BarThatReleases:
    """The pipeline's progress bar, wrapped: closing it (leaving its ``with`` block, or the end of iterating
    it) ends the generation the call holds on the runtime."""

    def __init__(self, bar: Any, end: Any) -> None:
        self._bar = bar
        self._end = end

    def _finish(self) -> None:
        end, self._end = self._end, None
        if end is not None:
            end()

    def __enter__(self) -> Any:
        return self._bar.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self._bar.__exit__(*exc)
        finally:
            self._finish()

    def __iter__(self) -> Any:
        try:
            yield from self._bar
        finally:
            self._finish()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


class _HoldsGenerations(Protocol):
    """A runtime whose generation a thread holds (:meth:`~catome_export.runtime.Runtime.generation`)."""

    def reset(self) -> None: ...

    def generation(self) -> AbstractContextManager[Any]: ...


class _GenerationOnCall(ResetOnCall):
    """``ResetOnCall`` for an attached runtime: the pipeline's call holds the runtime's generation (waiting for
    another thread's) from its progress bar's opening to its close."""

    target: _HoldsGenerations

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        holding = self.target.generation()
        holding.__enter__()  # waits for another thread's generation; resets the runtime
        try:
            bar = self.original(*args, **kwargs)
        except BaseException as exc:
            holding.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return _BarThatReleases(bar, lambda: holding.__exit__(None, None, None))


class Attachment:
    """A runtime attached to a pipeline; :meth:`detach` (or leaving the ``with`` block) undoes it.

    ::

        with attach(pipe, runtime) as attached:
            image = pipe(prompt).images[0]
            print(attached.history[-1].merged)
        # pipe.unet is the original U-Net again
    """

    def __init__(self, pipe: Any, runtime: Any) -> None:
        self._pipe = pipe
        self._runtime = runtime
        self._original_unet: Any = None
        self._progress_bar: ResetOnCall | None = None
        self._previous_size_flag: list[bool] = []
        """The pipeline's own ``_is_unet_config_sample_size_int`` while attached (empty when untouched)."""
        self._active = False

    # -- installation -----------------------------------------------------------------
    def _install(self) -> None:
        pipe, runtime = self._pipe, self._runtime
        self._original_unet = pipe.unet
        unet = runtime.unet
        try:
            pipe.unet = unet
            self._fix_sample_size_flag(unet)
            if callable(getattr(runtime, "set_timesteps", None)) and getattr(pipe, "scheduler", None) is not None:
                # feature caching numbers calls by their timestep's place in the scheduler's timesteps
                runtime.set_timesteps(lambda: getattr(pipe.scheduler, "timesteps", None))
            holds = callable(getattr(runtime, "generation", None))
            self._progress_bar = (_GenerationOnCall if holds else ResetOnCall).install(pipe, runtime)
            if self._progress_bar is None:
                logger.warning("%s has no progress_bar method: generations are told apart by rising timesteps "
                               "only; call runtime.reset() before each generation", type(pipe).__name__)
        except BaseException:
            self._uninstall()
            raise
        self._active = True

    def _fix_sample_size_flag(self, unet: Any) -> None:
        """Stable Diffusion pipelines note at construction whether ``unet.config.sample_size`` is an int, and
        read the default image size by it; a pipeline built with ``unet=None`` must learn it from the engine."""
        pipe = self._pipe
        if "_is_unet_config_sample_size_int" not in getattr(pipe, "__dict__", {}):
            return
        size = getattr(getattr(unet, "config", None), "sample_size", None)
        if size is None:
            return
        self._previous_size_flag = [pipe.__dict__["_is_unet_config_sample_size_int"]]
        object.__setattr__(pipe, "_is_unet_config_sample_size_int", isinstance(size, int))

    def _uninstall(self) -> None:
        pipe = self._pipe
        if callable(getattr(self._runtime, "set_timesteps", None)):
            self._runtime.set_timesteps(None)
        if self._progress_bar is not None:
            if not self._progress_bar.remove():
                logger.warning("the pipeline's progress_bar was replaced while the engine was attached; "
                               "leaving the new one in place")
            self._progress_bar = None
        if self._previous_size_flag:
            object.__setattr__(pipe, "_is_unet_config_sample_size_int", self._previous_size_flag.pop())
        if getattr(pipe, "unet", None) is self._runtime.unet:
            pipe.unet = self._original_unet
        else:
            logger.warning("pipe.unet was replaced while the engine was attached; leaving the new one in place")

    # -- public API -------------------------------------------------------------------
    @property
    def pipe(self) -> Any:
        return self._pipe

    @property
    def runtime(self) -> Any:
        return self._runtime

    @property
    def original_unet(self) -> Any:
        """The U-Net the pipeline had before :func:`attach` (put back by :meth:`detach`)."""
        return self._original_unet

    @property
    def active(self) -> bool:
        """True until :meth:`detach`."""
        return self._active

    @property
    def history(self) -> list[StepRecord]:
        """The runtime's per-step records of the current generation (step, merged r per site, times)."""
        history: list[StepRecord] = self._runtime.history
        return history

    def reset(self) -> None:
        """Start a new generation on the runtime (what every ``pipe(...)`` call does by itself)."""
        self._runtime.reset()

    def set_step(self, index: int) -> None:
        """Pin the 0-based loop index of the next U-Net call (custom denoising loops)."""
        self._runtime.set_step(index)

    def detach(self) -> None:
        """Put the original U-Net and ``progress_bar`` back. Safe to call twice; the runtime stays open."""
        if not self._active:
            return
        self._uninstall()
        self._active = False
        _unregister(_BY_PIPE, self._pipe, self)
        logger.debug("engine detached from %s", type(self._pipe).__name__)

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self._active else "detached"
        return f"Attachment({state}, {type(self._pipe).__name__}, {self._runtime!r})"


def _check_compatible(pipe: Any, runtime_unet: Any) -> None:
    """CatomeError when the pipeline's own U-Net and the engine disagree on what the pipeline feeds it."""
    own = getattr(pipe, "unet", None)
    own_config = getattr(own, "config", None)
    engine_config = getattr(runtime_unet, "config", None)
    if own_config is None or engine_config is None:
        return
    for key in _CHECKED_CONFIG:
        mine, theirs = own_config.get(key), engine_config.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            raise CatomeError(
                f"the engine's U-Net has {key}={theirs} but the pipeline's has {mine}: attach an engine built "
                "from this pipeline's model (catome-export build --model <the pipeline's model>)"
            )


def _check_controlnet(pipe: Any, runtime: Any) -> None:
    """CatomeError when a ControlNet pipeline gets an engine built without ControlNet inputs (its first U-Net call
    would be refused)."""
    if getattr(pipe, "controlnet", None) is not None and hasattr(runtime, "controlnet") and runtime.controlnet is None:
        raise CatomeError(f"{type(pipe).__name__} feeds its U-Net ControlNet residuals, which this engine was built "
                          "without: rebuild it with catome-export build ... --controlnet (docs/controlnet.md)")


def _check_devices(pipe: Any, runtime: Any) -> None:
    device = getattr(runtime, "device", None)
    if device is None:
        return
    for name in ("text_encoder", "vae"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            other = next((p.device for p in module.parameters()), None)
            if other is not None and other.type != torch.device(device).type:
                logger.warning("the pipeline's %s is on %s but the engine runs on %s: move the pipeline there "
                               "(pipe.to(%r)) before generating", name, other, device, str(device))


def attach(pipe: Any, runtime: Any) -> Attachment:
    """Use ``runtime.unet`` as ``pipe.unet``; every ``pipe(...)`` call then resets the runtime (step 0, no cache).

    ``pipe``: a diffusers pipeline with a ``.unet`` (e.g. ``StableDiffusionPipeline``).
    ``runtime``: a loaded :class:`~catome_export.runtime.Runtime`. Returns an
    :class:`Attachment` (a context manager); ``attachment.detach()`` restores
    the original U-Net. A pipeline carries one runtime at a time; a runtime may
    serve several pipelines, whose generations take turns (one thread each).
    """
    if not hasattr(pipe, "unet") or not hasattr(pipe, "__dict__"):
        raise CatomeError(f"expected a diffusers pipeline with a .unet, got {type(pipe).__name__}")
    unet = getattr(runtime, "unet", None)
    if unet is None or not callable(unet) or not callable(getattr(runtime, "reset", None)):
        raise CatomeError(f"expected a loaded Runtime (Runtime.load(engine_dir)), got {type(runtime).__name__}")
    if getattr(runtime, "_closed", False):
        raise CatomeError("this runtime was closed: load the engine again with Runtime.load(engine_dir)")
    current = _registered(_BY_PIPE, pipe)
    if current is not None and current.active:
        raise CatomeError("this pipeline already carries an engine: detach it before attaching another")
    _check_compatible(pipe, unet)
    _check_controlnet(pipe, runtime)
    _check_devices(pipe, runtime)
    attachment = Attachment(pipe, runtime)
    attachment._install()
    _register(_BY_PIPE, pipe, attachment)
    logger.debug("engine attached to %s", type(pipe).__name__)
    return attachment


def detach(target: Any) -> None:
    """Detach the engine from a pipeline (or detach an :class:`Attachment`); nothing happens if none is attached."""
    if isinstance(target, Attachment):
        target.detach()
        return
    current = _registered(_BY_PIPE, target)
    if current is not None:
        current.detach()
