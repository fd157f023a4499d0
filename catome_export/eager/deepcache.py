"""Eager DeepCache-style feature caching for a diffusers U-Net or pipeline, without copying any forward.

What :func:`apply_deepcache` installs, and :meth:`DeepCacheHandle.remove`
undoes:

- a forward pre-hook on the U-Net that decides, once per call, whether the
  call is full or cached (:class:`catome_export.featurecache.CacheClock`:
  the place of the call's timestep in the pipeline scheduler's timesteps, as
  ``DeepCacheSDHelper`` reads it);
- on the very modules ``DeepCacheSDHelper`` wraps (each down and up block,
  their resnets, attentions and samplers, the mid block), an instance
  ``forward`` that calls the module's own ``forward`` and keeps its output on
  a full call, and returns the kept output instead on a cached call where
  the module is outside the shallow branch;
- for a pipeline, a wrapper on the instance's ``progress_bar`` (called once
  per ``pipe(...)`` right before the denoising loop) that starts a new
  generation, so every call starts full with an empty cache.

It composes with :func:`catome_export.apply_catome` in either order: a
merge site inside a skipped module does not run on a cached call (its
CA-ToMe cache is left as it was), one inside the shallow branch merges as
usual.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from catome_export.eager._handle import PatchHandle
from catome_export.eager.patch import _timestep_value, split_target
from catome_export.errors import CatomeError
from catome_export.featurecache import (
    BlockPosition, CacheClock, FeatureCacheSettings, UNetLayout, is_skipped, position_of,
)
from catome_export.featurecache.branches import check_branch
from catome_export.featurecache.clock import CallRecord
from catome_export.featurecache.settings import DEFAULT_CACHE_BRANCH, DEFAULT_CACHE_INTERVAL
from catome_export.merging.steps import ResetOnCall, StepCounter

logger = logging.getLogger(__name__)


def wrapped_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(module path, module) of every module ``DeepCacheSDHelper.wrap_modules`` wraps, in its order."""
    out: list[tuple[str, torch.nn.Module]] = []

    def blocks(path: str, samplers: str) -> None:
        for i, block in enumerate(getattr(unet, path)):
            for kind in ("attentions", "resnets", samplers):
                for j, m in enumerate(getattr(block, kind, None) or []):
                    out.append((f"{path}.{i}.{kind}.{j}", m))
            out.append((f"{path}.{i}", block))

    blocks("down_blocks", "downsamplers")
    out.append(("mid_block", unet.mid_block))  # type: ignore[arg-type]
    blocks("up_blocks", "upsamplers")
    return out


def block_position(path: str, layout: UNetLayout) -> BlockPosition:
    """DeepCache's position of a wrapped module; a whole block sits at layer 0 of its block."""
    parts = path.split(".")
    if parts[0] == "mid_block":
        return BlockPosition("mid", 0, 0)
    if len(parts) == 2:
        k = int(parts[1])
        if parts[0] == "down_blocks":
            return BlockPosition("down", k, 0)
        return BlockPosition("up", len(layout.up_resnets) - k - 1, 0)
    pos = position_of(path, layout)
    if pos is None:  # pragma: no cover - wrapped_modules lists block paths only
        raise CatomeError(f"internal: {path} has no DeepCache position")
    return pos


class _CachedForward:
    """A module's instance ``forward``: the module's own forward, or its output of the last full call."""

    def __init__(self, handle: "DeepCacheHandle", path: str, original: Callable[..., Any], skip: bool) -> None:
        self.handle = handle
        self.path = path
        self.original = original
        self.skip = skip
        """Whether a cached call skips this module (outside the shallow branch)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        handle = self.handle
        if handle.call_is_cached and self.skip:
            return handle._outputs[self.path]
        out = self.original(*args, **kwargs)
        if self.skip and not handle.call_is_cached:
            handle._outputs[self.path] = out
        return out


class DeepCacheHandle(PatchHandle):
    """A live feature-caching patch on one U-Net; ``remove()`` restores the model exactly.

    ``history`` lists, per U-Net call of the current generation, whether it
    ran in full and its DeepCache position.
    """

    _what = "feature caching"

    def __init__(self, unet: torch.nn.Module, settings: FeatureCacheSettings, pipeline: Any | None,
                 timesteps: Sequence[Any] | Callable[[], Sequence[Any] | None] | None) -> None:
        super().__init__(unet)
        self._settings = settings
        self._pipeline = pipeline
        self.layout = UNetLayout.of(unet)
        check_branch(settings.branch, self.layout)
        self.clock = CacheClock(settings, self._timesteps_source(timesteps))
        self._counter = StepCounter()
        self._outputs: dict[str, Any] = {}
        self._full_key: tuple[Any, ...] | None = None
        self.call_is_cached = False
        self._installed: list[tuple[torch.nn.Module, _CachedForward, bool, Any]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._progress_bar: ResetOnCall | None = None

    def _timesteps_source(self, timesteps: Any) -> Callable[[], Sequence[Any] | None]:
        if callable(timesteps):
            return timesteps  # type: ignore[no-any-return]
        if timesteps is not None:
            fixed = list(timesteps)
            return lambda: fixed
        pipe = self._pipeline
        if pipe is not None and getattr(pipe, "scheduler", None) is not None:
            return lambda: getattr(pipe.scheduler, "timesteps", None)
        return lambda: None

    # -- installation -----------------------------------------------------------------
    def _install(self) -> None:
        try:
            self._hooks.append(self._unet.register_forward_pre_hook(self._unet_pre_hook, with_kwargs=True))
            self._hooks.append(self._unet.register_forward_hook(self._unet_hook))
            for path, module in wrapped_modules(self._unet):
                skip = is_skipped(block_position(path, self.layout), self._settings.branch)
                had = "forward" in module.__dict__
                previous = module.__dict__.get("forward")
                wrapper = _CachedForward(self, path, module.forward, skip)
                module.forward = wrapper  # type: ignore[method-assign]
                self._installed.append((module, wrapper, had, previous))
            if self._pipeline is not None:
                self._progress_bar = ResetOnCall.install(self._pipeline, self)
        except BaseException:
            self._uninstall()
            raise
        self._register()

    def _uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module, wrapper, had, previous in reversed(self._installed):
            if module.__dict__.get("forward") is not wrapper:
                logger.warning("the forward of a %s was replaced while feature caching was applied; leaving it",
                               type(module).__name__)
                continue
            if had:
                module.forward = previous  # type: ignore[method-assign]
            else:
                del module.__dict__["forward"]
        self._installed.clear()
        if self._progress_bar is not None:
            self._progress_bar.remove()
            self._progress_bar = None
        self._outputs.clear()

    # -- hooks ------------------------------------------------------------------------
    def _unet_pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        value = _timestep_value(timestep)
        index = self._counter.advance(value)
        if self._counter.new_generation:
            self._new_generation()
        key = (tuple(sample.shape), sample.dtype, sample.device) if isinstance(sample, torch.Tensor) else None
        ready = bool(self._outputs) and key is not None and key == self._full_key
        full = self.clock.begin(value, index, ready)
        self.call_is_cached = not full
        if full:
            self._full_key = key

    def _unet_hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.call_is_cached = False

    def _new_generation(self) -> None:
        self.clock.reset()
        self._outputs.clear()
        self._full_key = None

    # -- public API -------------------------------------------------------------------
    @property
    def settings(self) -> FeatureCacheSettings:
        return self._settings

    @property
    def history(self) -> list[CallRecord]:
        """Per U-Net call of the current generation: ``full`` and DeepCache's ``position``."""
        return list(self.clock.calls)

    def reset(self) -> None:
        """Start a new generation: the next call is full and refills the cache."""
        self._counter.reset()
        self._new_generation()

    def set_step(self, index: int) -> None:
        """Pin the loop index of the next U-Net call (custom loops without scheduler timesteps); 0 also starts a
        new generation."""
        self._counter.set_step(index)

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"DeepCacheHandle({state}, {self._settings.describe()})"


def apply_deepcache(pipe_or_unet: Any, interval: int = DEFAULT_CACHE_INTERVAL, branch: int = DEFAULT_CACHE_BRANCH,
                    *, full_steps: Sequence[int] | None = None, settings: FeatureCacheSettings | None = None,
                    timesteps: Sequence[Any] | Callable[[], Sequence[Any] | None] | None = None) -> DeepCacheHandle:
    """Apply DeepCache-style feature caching to a diffusers pipeline or U-Net, in place.

    ``interval`` and ``branch`` mean exactly what ``cache_interval`` and
    ``cache_branch_id`` mean to ``DeepCacheSDHelper.set_params``: every
    ``interval``-th call is full (counted by the place of the call's
    timestep in ``pipe.scheduler.timesteps`` from the first call of the
    generation), the others rerun only the shallow branch ``branch`` on the
    deep features of the last full call. ``full_steps`` instead lists the
    full call positions (0 included; see
    :func:`catome_export.featurecache.nonuniform_full_steps` for DeepCache's
    non-uniform schedule). ``timesteps`` (a sequence, or a callable returning
    one) is where positions are looked up for a bare U-Net; without it, and
    without a pipeline, calls are numbered by loop index. Or pass a ready
    ``settings=FeatureCacheSettings(...)``.

    Use the handle as a context manager, or call ``handle.remove()``.
    """
    if settings is None:
        settings = FeatureCacheSettings(interval=interval, branch=branch,
                                        full_steps=None if full_steps is None else tuple(full_steps))
    elif not isinstance(settings, FeatureCacheSettings):
        raise CatomeError(f"settings must be a FeatureCacheSettings, got {type(settings).__name__}")
    elif (interval, branch, full_steps) != (DEFAULT_CACHE_INTERVAL, DEFAULT_CACHE_BRANCH, None):
        raise CatomeError("pass either settings= or interval/branch/full_steps, not both")
    pipeline, unet = split_target(pipe_or_unet)
    DeepCacheHandle.refuse_if_patched(unet)
    if getattr(unet, "mid_block", None) is None:
        raise CatomeError("feature caching needs a U-Net with a mid block (the deepest features it caches)")
    handle = DeepCacheHandle(unet, settings, pipeline, timesteps)
    handle._install()
    return handle
