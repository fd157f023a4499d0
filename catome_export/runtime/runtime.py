"""The runtime: a loaded engine, its merge controller, and a U-Net-shaped module to call it.

Each U-Net call is one controller step: the controller numbers it (and starts
a new generation when told, or when the timestep rises), the chain of stages
runs, and after the stage that returns ``x{k}`` the controller gives site k's
plan (matched now on checkpoint steps or with an empty cache, else the cached
one) whose five tensors feed the stage that runs site k. Matching runs in
torch on the stages' device; the only host read is r.

Streams: where the backend owns a CUDA stream (TensorRT, ONNX Runtime CUDA),
a whole call runs on it: it first waits for the caller's current stream
(which produced ``sample`` and the other inputs), the stages, matching and
any graph replay run on it, and the caller's stream then waits for it, with
``noise_pred`` marked as used on the caller's stream so its memory is not
handed to the runtime's next call too early.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from catome_export.checks import check_float
from catome_export.backends import create_backend
from catome_export.backends.base import Backend, StageRunner, StreamOwner
from catome_export.backends.select import choose_backend
from catome_export.backends.torch_backend import manifest_dtype
from catome_export.defaults import DEFAULT_TEXT_LEN, MAX_BATCH, MAX_RESOLUTION
from catome_export.errors import CatomeError
from catome_export.engine.controlnet import ControlNetInputs
from catome_export.engine.io_names import ADDED_INPUTS, MODEL_OUTPUT, SAMPLE, TEXT, TIMESTEP, plan_names
from catome_export.engine.manifest import FeatureCacheRecord, Manifest, ModelRecord, StageRecord
from catome_export.engine.shapes import ShapeRanges
from catome_export.engine.specs import StageSpec
from catome_export.engine.engine import Engine, EngineSource
from catome_export.featurecache import CacheClock, FeatureCacheSettings, parse_feature_cache
from catome_export.featurecache.clock import Timesteps
from catome_export.merging import MergeController, MergeSettings, MergePlan
from catome_export.merging.steps import StepRecord
from catome_export.models.sites import MergeSite
from catome_export.runtime.chain import StageChain
from catome_export.runtime.ownership import GenerationOwner

logger = logging.getLogger(__name__)

ShapeCheck = Callable[[int, int, int], None]
"""``(batch, latent_h, latent_w) -> None``, raising CatomeError outside the built range."""


class Runtime:
    """A loaded engine: ``runtime.unet`` stands in for a diffusers ``UNet2DConditionModel``.

    Build it with :meth:`load` (an engine folder), or :meth:`from_parts` (ready stage runners: tests and other
    front ends). Its :attr:`manifest` and :attr:`backend` are always set.
    """

    def __init__(self, runners: Sequence[StageRunner], sites: Sequence[MergeSite], settings: MergeSettings, *,
                 unet_config: Mapping[str, Any], dtype: torch.dtype, device: torch.device | str,
                 backend: Backend, manifest: Manifest, shape_check: ShapeCheck | None = None,
                 engine_dir: Path | None = None, feature_cache: FeatureCacheSettings | None | str = "engine") -> None:
        self.chain = StageChain(runners)
        self.controlnet: ControlNetInputs | None = ControlNetInputs.of(self.chain.specs)
        """The ControlNet residual inputs of an engine built with ``--controlnet`` (None: it takes none)."""
        self._zero_residuals: tuple[tuple[Any, ...], dict[str, torch.Tensor]] | None = None
        self.sites = {s.index: s for s in sites}
        missing = [k for k in self.chain.sites if k not in self.sites]
        if missing:
            raise CatomeError(f"the stage chain reaches sites {missing} that the manifest does not list: "
                              "rebuild the engine")
        self.settings = settings
        self.dtype = dtype
        self.device = torch.device(device)
        self.backend: Backend = backend
        self.manifest: Manifest = manifest
        self.engine_dir = engine_dir
        self.shape_check = shape_check
        self.sync_timing = True
        """On CUDA, wait for the device at the end of each call so ``step_ms`` is the real step time."""
        self._controller = MergeController(settings, len(self.sites), validate=True)
        self._timings: list[tuple[float, float]] = []
        self._closed = False
        self._graphs: Any = None
        self._shallow_graphs: dict[int, Any] = {}
        """Per feature-cache branch, the graph runner of its cached calls (with CUDA graphs on)."""
        self._keeping_graphs: dict[int, Any] = {}
        """Per feature-cache branch, the graph runner of its full calls: the whole chain, with the deep outputs the
        next cached calls read among the graph's outputs (with CUDA graphs on)."""
        self._last_shape: tuple[int, int, int] | None = None
        self._owner = GenerationOwner()
        self._lora_active: Any = None
        """The LoRA entries set by :meth:`set_lora` (None: the manifest's)."""
        self._lora_overrides: Any = None
        """Weights that differ from the graphs' after :meth:`set_lora` (None: the manifest's overrides file)."""
        self.cache_record: FeatureCacheRecord | None = manifest.feature_cache
        """The feature-cache branches the engine's stages were cut for (None: none)."""
        if self.cache_record is not None:
            for branch in self.cache_record.branches:
                self.chain.check_subset(branch.stages, branch.cached)
        self._cache_settings: FeatureCacheSettings | None = None
        self._timesteps: Timesteps = lambda: None
        self._clock: CacheClock | None = None
        self._kept: dict[str, torch.Tensor] = {}
        self._kept_key: tuple[int, ...] | None = None
        self._kinds: list[bool] = []
        feature_cache = feature_cache_value(feature_cache)
        self._set_feature_cache(self.cache_record.settings if feature_cache == "engine" and self.cache_record
                                else None if feature_cache == "engine" else feature_cache)  # type: ignore[arg-type]
        from catome_export.runtime.unet import RuntimeUNet

        self.unet = RuntimeUNet(self, unet_config)
        """The U-Net-shaped module: ``pipe.unet = runtime.unet`` (see :meth:`attach`)."""

    # -- loading ----------------------------------------------------------------------
    @classmethod
    def from_parts(cls, runners: Sequence[StageRunner], sites: Sequence[MergeSite], settings: MergeSettings, *,
                   unet_config: Mapping[str, Any], dtype: torch.dtype, device: torch.device | str,
                   backend: Backend | None = None, manifest: Manifest | None = None,
                   shape_check: ShapeCheck | None = None, engine_dir: Path | None = None,
                   feature_cache: FeatureCacheSettings | None | str = "engine",
                   cache_record: FeatureCacheRecord | None = None) -> "Runtime":
        """A runtime over ready stage runners (tests, front ends that load stages themselves).

        ``backend``: the one that made the runners (default :class:`PartsBackend`, which loads nothing);
        ``manifest``: the engine's (default :func:`parts_manifest` of the runners' specs, ``sites``,
        ``settings``, ``unet_config`` and ``dtype``); ``cache_record``: the feature-cache branches the
        stages were cut for, in place of the manifest's.
        """
        device = torch.device(device)
        if manifest is None:
            manifest = parts_manifest([r.spec for r in runners], sites, settings, unet_config, dtype)
        if cache_record is not None:
            manifest = replace(manifest, feature_cache=cache_record)
        return cls(runners, sites, settings, unet_config=unet_config, dtype=dtype, device=device,
                   backend=backend if backend is not None else PartsBackend(device), manifest=manifest,
                   shape_check=shape_check, engine_dir=engine_dir, feature_cache=feature_cache)

    @classmethod
    def load(cls, engine: EngineSource, backend: str = "auto", device: torch.device | str | None = None, *,
             settings: MergeSettings | None = None, backend_options: Mapping[str, Any] | None = None,
             cuda_graphs: bool = False, feature_cache: FeatureCacheSettings | None | str = "engine") -> "Runtime":
        """Load ``engine`` (an :class:`~catome_export.engine.engine.Engine`, or its folder, opened and checked
        here) on a backend: auto, trt, ort, ort-cuda, ort-cpu or torch.

        ``settings`` overrides the manifest's merge settings (threshold,
        schedule...; the graphs take any merge count, so this needs no
        rebuild). ``backend_options`` go to the backend (e.g. ONNX Runtime's
        ``intra_op_threads``). ``cuda_graphs``: replay cached steps as CUDA
        graphs (TensorRT or torch backend on a GPU; see :meth:`enable_cuda_graphs`).
        """

        opened = Engine.open(engine)
        engine_dir, manifest = opened.path, opened.manifest
        check_feature_cache(manifest.feature_cache, feature_cache)  # before any stage loads
        choice = choose_backend(backend, engine_backend=manifest.engine_backend, device=device)
        logger.info("backend: %s", choice.reason)
        be = create_backend(choice, opened, device=device, options=backend_options)
        if hasattr(be, "initializer_overrides"):  # ONNX Runtime: a refit LoRA's weights in place of the graphs'
            from catome_export.lora.refit import InitializerOverrides

            be.initializer_overrides = InitializerOverrides.of(engine_dir, manifest)
        runners: list[StageRunner] = []
        try:
            for stage in manifest.stages:
                runners.append(be.load_stage(engine_dir, stage))
            built = manifest.merge
            if settings is not None:
                _check_same_graphs(built, settings)
            runtime = cls(
                runners, manifest.sites, settings or built,
                unet_config=manifest.model.unet_config, dtype=manifest_dtype(manifest),
                device=be.device, backend=be, shape_check=manifest.check_shapes, manifest=manifest,
                engine_dir=engine_dir, feature_cache=feature_cache,
            )
            if cuda_graphs:
                runtime.enable_cuda_graphs()
            return runtime
        except BaseException:
            for runner in runners:
                runner.close()
            be.close()
            raise

    # -- controller -------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new generation: empty plan caches, the next call is loop index 0.

        The generation belongs to the calling thread until it calls :meth:`release` or ends (see
        :meth:`generation` and :mod:`catome_export.runtime.ownership`).
        """
        self._claim("reset()")
        self._reset_state()

    def _reset_state(self) -> None:
        self.controller.reset()
        self._timings = []
        self._last_shape = None
        self._reset_features()

    def _reset_features(self) -> None:
        if self._clock is not None:
            self._clock.reset()
        self._kept = {}
        self._kept_key = None
        self._kinds = []

    def set_step(self, index: int) -> None:
        """Pin the 0-based loop index of the next U-Net call (custom loops; 0 starts a new generation)."""
        self._claim("set_step()")
        self.controller.set_step(index)

    # -- which thread a generation belongs to -----------------------------------------
    def _claim(self, what: str, *, explicit: bool = False) -> tuple[bool, bool]:
        """Hold the runtime for this thread (refused or waiting while another thread's generation runs, before
        anything changes); a runtime passed on from another thread starts a new generation."""
        newly, handed_over, was_explicit = self._owner.claim(what, explicit=explicit)
        if handed_over:
            self._reset_state()
        return newly, was_explicit

    @contextmanager
    def generation(self) -> Iterator["Runtime"]:
        """``with runtime.generation():`` one generation held by this thread: it starts with a reset, other
        threads' calls wait until the block ends (a pipeline call through :meth:`attach` does the same)."""
        newly, was_explicit = self._claim("generation()", explicit=True)
        try:
            self._reset_state()
            yield self
        finally:
            if newly:
                self._owner.release()
            else:
                self._owner.restore(was_explicit)

    def release(self) -> bool:
        """End this thread's hold on the runtime (manual loops: after the last step of a generation), so other
        threads may use it; False when this thread did not hold it. Ending the thread releases it too."""
        return self._owner.release()

    @property
    def wait_timeout_s(self) -> float | None:
        """How long a call waits for another thread's ``generation()`` or pipeline call (None: no limit)."""
        return self._owner.wait_timeout_s

    @wait_timeout_s.setter
    def wait_timeout_s(self, value: float | None) -> None:
        self._owner.wait_timeout_s = None if value is None else check_float(
            "wait_timeout_s", value, 0, finite=False, unit="seconds", hint="or None: no limit")

    @property
    def controller(self) -> MergeController:
        """The merge controller (plan caches, step numbering); read-only: change settings with ``set_settings``,
        which keeps plan validation on."""
        return self._controller

    def set_settings(self, settings: MergeSettings, *, feature_cache: FeatureCacheSettings | None | str = "keep") -> None:
        """Use other merge settings from the next call on (threshold, schedule...); starts a new generation.

        ``feature_cache``: also change the feature caching (settings, None for off; ``"keep"``, the default,
        leaves it as it is): any interval, and a branch the engine was cut for."""
        _check_same_graphs(self.settings, settings)
        feature_cache = feature_cache_value(feature_cache)
        if feature_cache != "keep":
            self._check_feature_cache(feature_cache)
        self._claim("set_settings()")
        self.settings = settings
        self._controller = MergeController(settings, len(self.sites), validate=True)
        self._timings = []
        self._last_shape = None
        if feature_cache != "keep":
            self._set_feature_cache(feature_cache)  # type: ignore[arg-type]
        self._reset_features()

    # -- feature caching --------------------------------------------------------------
    @property
    def feature_cache(self) -> FeatureCacheSettings | None:
        """The DeepCache-style caching in use (None: every call runs the whole chain)."""
        return self._cache_settings

    def set_feature_cache(self, settings: FeatureCacheSettings | str | None) -> None:
        """Use other feature caching from the next call on (None or ``"off"``: off; ``"I,b"`` is parsed); starts a
        new generation."""
        parsed = feature_cache_value(settings)
        if parsed in ("engine", "keep"):
            raise CatomeError("set_feature_cache takes FeatureCacheSettings, 'I,b', 'off' or None")
        self._check_feature_cache(parsed)
        self._claim("set_feature_cache()")
        self._set_feature_cache(parsed)
        self._reset_state()

    def set_timesteps(self, timesteps: Sequence[Any] | Timesteps | None) -> None:
        """Where feature caching looks up a call's position (DeepCache: the index of its timestep in
        ``scheduler.timesteps``): a sequence, a callable returning one, or None to number calls by loop index.
        ``attach`` sets it to the pipeline scheduler's timesteps."""
        if timesteps is None:
            self._timesteps = lambda: None
        elif callable(timesteps):
            self._timesteps = timesteps
        else:
            fixed = list(timesteps)
            self._timesteps = lambda: fixed
        if self._clock is not None:
            self._clock.timesteps = self._timesteps

    def _check_feature_cache(self, settings: Any) -> None:
        check_feature_cache(self.cache_record, settings)

    def _set_feature_cache(self, settings: FeatureCacheSettings | None) -> None:
        self._check_feature_cache(settings)
        self._cache_settings = settings if settings is not None and settings.caches else None
        self._clock = None if self._cache_settings is None else CacheClock(self._cache_settings, self._timesteps)
        self._kept = {}
        self._kept_key = None

    @property
    def history(self) -> list[StepRecord]:
        """One record per U-Net call of the current generation."""
        kinds = self._kinds if self._clock is not None else []
        return [StepRecord(s.step, dict(s.merged), dict(s.matched), t[0], t[1],
                           cached_features=bool(kinds[i]) if i < len(kinds) else False)
                for i, (s, t) in enumerate(zip(self.controller.history, self._timings))]

    # -- running ----------------------------------------------------------------------
    def step(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
             timestep_value: float | None = None, added: dict[str, torch.Tensor] | None = None,
             controlnet: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One U-Net call on validated inputs (``timestep`` float32 [B]); returns ``noise_pred``.

        ``timestep_value`` is the scalar the controller numbers steps with
        (default: the first element of ``timestep``). ``added``: an SDXL-style
        engine's ``text_embeds`` and ``time_ids`` (checked by ``runtime.unet``).
        ``controlnet``: the ControlNet residual inputs by graph name (``controlnet_down{i}``, ``controlnet_mid``;
        checked by ``runtime.unet``) of an engine built with ``--controlnet``; None feeds zeros, which is the
        U-Net without ControlNet.
        """
        if self._closed:
            raise CatomeError("this runtime was closed: load the engine again")
        if controlnet is not None and self.controlnet is None:
            raise CatomeError("this engine was built without --controlnet and takes no ControlNet residuals: "
                              "rebuild it with catome-export build ... --controlnet")
        missing = [n for n in ADDED_INPUTS if n not in (added or {}) and self.chain.input_spec(n) is not None]
        if missing:
            raise CatomeError(f"this engine is an SDXL-style U-Net and needs {missing}: call runtime.unet(..., "
                              "added_cond_kwargs={'text_embeds': ..., 'time_ids': ...}) as StableDiffusionXLPipeline "
                              "does")
        self._claim("a U-Net call")
        start = time.perf_counter()
        if timestep_value is None:
            timestep_value = float(timestep.reshape(-1)[0]) if timestep.numel() else None
        step = self.controller.begin_step(timestep_value)
        if self.controller.counter.new_generation:
            self._timings = []
            self._last_shape = None
            self._reset_features()
        latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        shape = (int(sample.shape[0]), *latent_hw)
        try:
            features = self._feature_step(timestep_value, step, (*shape, int(encoder_hidden_states.shape[1])))
        except BaseException:
            self._timings.append((float("nan"), float("nan")))  # keep records aligned with the controller's steps
            self._kinds.append(False)
            raise
        spent = 0.0

        def plan_hook(site: int, x: torch.Tensor) -> MergePlan:
            nonlocal spent
            t0 = time.perf_counter()
            grid = self.sites[site].grid(latent_hw)
            if grid[0] * grid[1] != x.shape[1]:
                raise CatomeError(f"site {site}: grid {grid} does not cover its {x.shape[1]} tokens: "
                                  "the manifest's sites do not match the graphs; rebuild the engine")
            plan = self.controller.plan_for(site, x, grid)
            spent += time.perf_counter() - t0
            return plan

        env = {SAMPLE: sample, TIMESTEP: timestep, TEXT: encoder_hidden_states, **(added or {})}
        if self.controlnet is not None:
            env.update(controlnet if controlnet is not None else self._zeros(shape, sample))
        # Every site reuses its cache when this is no checkpoint and the previous call of this generation
        # completed with the same batch and size (it left a plan of these shapes at every site).
        cached_step = not self.settings.schedule.is_checkpoint(step) and self._last_shape == shape
        self._last_shape = None
        try:
            stream = self._stream()
            if stream is None:
                noise_pred = self._run_chain(env, latent_hw, plan_hook, cached_step, features)
            else:
                caller = torch.cuda.current_stream(self.device)
                stream.wait_stream(caller)
                try:
                    with torch.cuda.stream(stream):
                        noise_pred = self._run_chain(env, latent_hw, plan_hook, cached_step, features)
                    noise_pred.record_stream(caller)
                finally:
                    caller.wait_stream(stream)
            if self.sync_timing and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except BaseException:
            self._timings.append((float("nan"), float("nan")))  # keep records aligned with the controller's steps
            if features is not None:  # a failed full call leaves no usable features
                self._kept = {}
                self._kept_key = None
            raise
        self._last_shape = shape
        self._timings.append(((time.perf_counter() - start) * 1e3, spent * 1e3))
        return noise_pred

    def _zeros(self, shape: tuple[int, int, int], sample: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero ControlNet residuals for a call without them (kept while the shape stays; no stage writes its
        inputs)."""
        key = (shape, sample.dtype, sample.device)
        if self._zero_residuals is None or self._zero_residuals[0] != key:
            assert self.controlnet is not None
            down, mid = self.controlnet.shapes(shape[0], shape[1:])
            feeds = {t.name: torch.zeros(s, dtype=t.torch_dtype, device=sample.device)
                     for t, s in zip((*self.controlnet.down, self.controlnet.mid), (*down, mid))}
            self._zero_residuals = (key, feeds)
        return dict(self._zero_residuals[1])

    def _feature_step(self, timestep_value: float | None, step: int, key: tuple[int, ...]) -> bool | None:
        """This call's kind under feature caching: True for a cached call, False for a full one, None when
        caching is off."""
        if self._clock is None:
            return None
        ready = bool(self._kept) and self._kept_key == key
        full = self._clock.begin(timestep_value, step, ready)
        if full:
            self._kept = {}
            self._kept_key = key
        self._kinds.append(not full)
        return not full

    def _run_chain(self, env: dict[str, torch.Tensor], latent_hw: tuple[int, int], plan_hook: Any,
                   cached_step: bool, features: bool | None = None) -> torch.Tensor:
        """The chain of one call: with feature caching, the whole chain keeping the deep features (full call) or
        the shallow branch on them (cached call); else a graph replay on a cached step with graphs on, else stage
        by stage."""
        if features is not None:
            branch = self._branch()
            if features:
                env.update(self._kept)
                if self._graphs is not None and cached_step:
                    replayed = self._replay_shallow(env, latent_hw, branch)
                    if replayed is not None:
                        return replayed
                return self.chain.run(env, plan_hook, stages=branch.stages)
            if self._graphs is not None and cached_step:
                replayed = self._replay_keeping(env, latent_hw, branch)
                if replayed is not None:
                    return replayed
            return self.chain.run(env, plan_hook, keep=branch.cached, kept=self._kept)
        if self._graphs is not None and cached_step:
            return self._replay(env, latent_hw)
        return self.chain.run(env, plan_hook)

    def _branch(self) -> Any:
        settings, record = self._cache_settings, self.cache_record
        found = None if settings is None or record is None else record.branch(settings.branch)
        if found is None:  # _check_feature_cache refuses this before
            raise CatomeError("internal: feature caching is on without a branch the engine was cut for")
        return found

    def _stream(self) -> "torch.cuda.Stream | None":
        """The backend's own CUDA stream, which a call runs on; None where there is none (CPU, torch backend)."""
        if self.device.type != "cuda" or not isinstance(self.backend, StreamOwner):
            return None
        return self.backend.stream.stream

    # -- CUDA graphs ------------------------------------------------------------------
    def enable_cuda_graphs(self, capture: Any = None, max_graphs: int = 4) -> None:
        """Run cached steps (no site matches) as one captured CUDA graph of the whole chain, replayed while
        the shapes stay (rules in :mod:`catome_export.runtime.cuda_graphs`); checkpoint steps run stage by stage.

        Needs a CUDA device and the TensorRT or torch backend (ONNX Runtime allocates its outputs itself,
        which a capture cannot hold). Each graph is captured on stage runners of its own (for TensorRT, an
        execution context per stage and graph, all on the shared scratch memory); checkpoint steps run on
        the runtime's own runners, which no graph is captured on. ``capture``: a stand-in for the capture
        implementation (tests).
        """
        from catome_export.runtime.cuda_graphs import ChainGraphRunner, TorchCudaGraphCapture, graph_chain

        if capture is None:
            if self.device.type != "cuda":
                raise CatomeError(f"CUDA graphs need a CUDA device; this runtime runs on {self.device}")
            name = self.backend.name
            if name not in ("trt", "torch"):
                raise CatomeError(f"CUDA graphs run with the trt or torch backend, not {name} "
                                  "(ONNX Runtime allocates its outputs itself)")
            capture = TorchCudaGraphCapture(self.device, stream=self._stream())
        memory: Any = getattr(self.backend, "memory", None)
        generation = (lambda: memory.generation) if hasattr(memory, "generation") else None
        if self._graphs is not None:
            self._graphs.invalidate(reason="CUDA graphs enabled again")
        self._drop_shallow_graphs("CUDA graphs enabled again")
        runners = list(self.chain.runners)
        self._graphs = ChainGraphRunner(lambda: graph_chain(runners), capture, max_graphs=max_graphs,
                                        memory_generation=generation)

    def _drop_shallow_graphs(self, reason: str) -> None:
        """Drop the graph runners of feature-cached calls and of the full calls that keep their features."""
        for runner in (*self._shallow_graphs.values(), *self._keeping_graphs.values()):
            runner.invalidate(reason=reason)
        self._shallow_graphs = {}
        self._keeping_graphs = {}

    @property
    def shallow_graph_runners(self) -> dict[int, Any]:
        """Per feature-cache branch, the CUDA-graph runner of its cached calls (empty until one replayed)."""
        return dict(self._shallow_graphs)

    @property
    def keeping_graph_runners(self) -> dict[int, Any]:
        """Per feature-cache branch, the CUDA-graph runner of its full calls, which also output the deep features
        the cached calls reuse (empty until one replayed)."""
        return dict(self._keeping_graphs)

    @property
    def graph_runner(self) -> Any:
        """The CUDA-graph runner (None unless :meth:`enable_cuda_graphs` was called)."""
        return self._graphs

    def _replay(self, env: dict[str, torch.Tensor], latent_hw: tuple[int, int]) -> torch.Tensor:
        """A cached step through the graph runner: the cached plans, recorded as reused, feed the captured chain."""
        from catome_export.runtime.cuda_graphs import ChainGraphCache

        batch = int(env[SAMPLE].shape[0])
        plans: dict[int, MergePlan] = {}
        for site in self.chain.sites:
            grid = self.sites[site].grid(latent_hw)
            plan = self.controller.cached_plan(site, batch, grid, self.device)
            if plan is None:
                raise CatomeError(f"internal: site {site} has no cached plan on a step the runtime took for a cached one")
            plans[site] = plan
            env.update(zip(plan_names(site), plans[site].tensors()))
        key = ChainGraphCache.key(batch, latent_hw, {k: p.num_merged for k, p in plans.items()})
        outputs: dict[str, torch.Tensor] = self._graphs.run(key, env, plan_versions=plans)
        return outputs[MODEL_OUTPUT]

    def _cached_plans(self, sites: Sequence[int], env: dict[str, torch.Tensor], latent_hw: tuple[int, int],
                      batch: int) -> dict[int, MergePlan] | None:
        """The cached plans of ``sites``, fed into ``env``; None (``env`` untouched) when one site has none."""
        plans: dict[int, MergePlan] = {}
        for site in sites:
            plan = self.controller.cached_plan(site, batch, self.sites[site].grid(latent_hw), self.device)
            if plan is None:
                return None
            plans[site] = plan
        for site, plan in plans.items():
            env.update(zip(plan_names(site), plan.tensors()))
        return plans

    def _replay_keeping(self, env: dict[str, torch.Tensor], latent_hw: tuple[int, int],
                        branch: Any) -> torch.Tensor | None:
        """A full call of feature caching on a step where every site reuses its plan, as a captured graph of the
        whole chain whose outputs also hold the deep features the next cached calls read (its own graph runner per
        branch: the outputs, and so the graph, differ from a plain call's). The runner returns copies of the
        graph's outputs on the device, so the next replay cannot change the kept features. None when a site must
        match (the call then runs stage by stage)."""
        from catome_export.runtime.cuda_graphs import ChainGraphCache, ChainGraphRunner, graph_chain

        batch = int(env[SAMPLE].shape[0])
        plans = self._cached_plans(self.chain.sites, env, latent_hw, batch)
        if plans is None:
            return None
        runner = self._keeping_graphs.get(branch.branch)
        if runner is None:
            runners, outputs = list(self.chain.runners), (MODEL_OUTPUT, *branch.cached)
            runner = ChainGraphRunner(lambda: graph_chain(runners, outputs), self._graphs.capture_impl,
                                      max_graphs=self._graphs.cache.max_entries,
                                      memory_generation=self._graphs.memory_generation)
            self._keeping_graphs[branch.branch] = runner
        inputs = {name: env[name] for name in self.chain.external_inputs(range(len(self.chain.specs)))
                  if name in env}
        key = ChainGraphCache.key(batch, latent_hw, {k: p.num_merged for k, p in plans.items()})
        result: dict[str, torch.Tensor] = runner.run(key, inputs, plan_versions=plans)
        self._kept.update({name: result[name] for name in branch.cached})
        return result[MODEL_OUTPUT]

    def _replay_shallow(self, env: dict[str, torch.Tensor], latent_hw: tuple[int, int],
                        branch: Any) -> torch.Tensor | None:
        """A feature-cached call whose shallow sites all reuse their plans, as a captured graph of the shallow
        stages (its own graph runner per branch, so its key and inputs are its own); None when a site must match
        (the call then runs stage by stage)."""
        from catome_export.runtime.cuda_graphs import ChainGraphCache, ChainGraphRunner, graph_chain

        batch = int(env[SAMPLE].shape[0])
        sites = [site for site in (self.chain.specs[i].site for i in branch.stages) if site is not None]
        plans = self._cached_plans(sites, env, latent_hw, batch)
        if plans is None:
            return None
        runner = self._shallow_graphs.get(branch.branch)
        if runner is None:
            stages = [self.chain.runners[i] for i in branch.stages]
            runner = ChainGraphRunner(lambda: graph_chain(stages), self._graphs.capture_impl,
                                      max_graphs=self._graphs.cache.max_entries,
                                      memory_generation=self._graphs.memory_generation)
            self._shallow_graphs[branch.branch] = runner
        inputs = {name: env[name] for name in self.chain.external_inputs(branch.stages) if name in env}
        key = ChainGraphCache.key(batch, latent_hw, {k: p.num_merged for k, p in plans.items()})
        outputs: dict[str, torch.Tensor] = runner.run(key, inputs, plan_versions=plans)
        return outputs[MODEL_OUTPUT]

    def attach(self, pipe: Any) -> Any:
        """Put ``runtime.unet`` into a diffusers pipeline; every ``pipe(...)`` call then resets the caches.

        Shorthand for :func:`catome_export.runtime.embed.attach` (pipelines
        call ``progress_bar`` once per generation, right before the denoising
        loop, and the attachment resets the runtime there, so each generation
        starts at step 0 even with the same timesteps). Returns the
        attachment: a context manager whose ``detach()`` puts the original
        U-Net back.
        """
        from catome_export.runtime.embed import attach

        return attach(pipe, self)

    # -- LoRA -------------------------------------------------------------------------
    @property
    def lora(self) -> str:
        """The LoRA the engine computes now: ``none`` or ``file.safetensors:SCALE`` (joined by `` + ``)."""
        entries = self._lora_active if self._lora_active is not None else (
            self.manifest.lora.active if self.manifest.lora is not None else ())
        return " + ".join(f"{Path(e.source).name}:{e.scale:g}" for e in entries) or "none"

    def set_lora(self, loras: Any, *, save: bool = False) -> str:
        """Swap the engine's LoRA in place, without a re-export; starts a new generation. Returns :attr:`lora`.

        ``loras``: None or ``"none"`` (the base weights, bit for bit), ``"FILE[:SCALE]"``, a
        :class:`~catome_export.lora.LoraSpec`, a ``(file, scale)`` pair, or a list of them (fused in order).
        ONNX Runtime: the sessions of the stages whose weights change are made again from the same graphs with
        the new initializers; TensorRT: the plans (built ``--refittable``) are refit. A LoRA whose keys do not
        fit the model is a CatomeError before anything changes. ``save``: also refit the engine folder on disk
        (``catome-export refit``), so the next load computes the same LoRA and ``verify`` checks it.
        """
        from catome_export.lora.refit import apply_to_runtime

        self._claim("set_lora()")
        apply_to_runtime(self, loras, save=save)
        self._reset_state()
        return self.lora

    def replace_runners(self, runners: Mapping[int, StageRunner]) -> None:
        """Put new runners in place of the chain's stages with those indices (same specs; the old ones are closed,
        CUDA graphs captured with them dropped)."""
        graphs = self._graphs
        if graphs is not None:
            graphs.invalidate(reason="stages replaced")
            self._graphs = None
        self._drop_shallow_graphs("stages replaced")
        for index, runner in runners.items():
            old = self.chain.runners[index]
            if runner.spec != old.spec:
                raise CatomeError(f"internal: the new runner of stage {index} has another spec")
            self.chain.runners[index] = runner
            old.close()
        if graphs is not None:
            self.enable_cuda_graphs(graphs.capture_impl, graphs.cache.max_entries)

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Release the stages and the backend; the runtime cannot run afterwards."""
        if self._closed:
            return
        self._closed = True
        if self._graphs is not None:
            self._graphs.invalidate(reason="runtime closed")
            self._graphs = None
        self._drop_shallow_graphs("runtime closed")
        self.chain.close()
        self.backend.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        name = self.backend.name
        cache = "" if self._cache_settings is None else f", {self._cache_settings.describe()}"
        return (f"Runtime({name} on {self.device}, {len(self.chain.runners)} stages, {len(self.sites)} sites, "
                f"{self.settings.mode}, {self.settings.schedule.describe()}{cache})")


def feature_cache_value(value: Any) -> Any:
    """``value`` with a command-line spelling (``"3,0"``, ``"off"``) parsed; ``"engine"`` / ``"keep"`` as they are."""
    if isinstance(value, str) and value not in ("engine", "keep"):
        return parse_feature_cache(value)
    return value


def check_feature_cache(record: FeatureCacheRecord | None, settings: Any) -> None:
    """CatomeError unless ``settings`` (FeatureCacheSettings or None) can run on an engine cut as ``record`` says."""
    settings = feature_cache_value(settings)
    if settings is None or settings == "engine":
        return
    if not isinstance(settings, FeatureCacheSettings):
        raise CatomeError(f"feature cache must be a FeatureCacheSettings or None, got {type(settings).__name__}")
    if not settings.caches:
        return
    cut = () if record is None else record.branch_ids
    if settings.branch not in cut:
        have = f"branches {list(cut)}" if cut else "no feature-cache branch"
        raise CatomeError(f"this engine was cut for {have}; feature-cache branch {settings.branch} needs a "
                          f"rebuild with catome-export build ... --cache-branches {settings.branch} (or "
                          f"--feature-cache I,{settings.branch})")


def _check_same_graphs(built: MergeSettings, settings: Any) -> None:
    """CatomeError unless ``settings`` only changes what the graphs take as inputs (threshold, schedule, ...)."""
    if not isinstance(settings, MergeSettings):
        raise CatomeError(f"settings must be a MergeSettings, got {type(settings).__name__}")
    fixed = ("max_downsample", "merge_crossattn", "merge_mlp")
    changed = [f"{name} {getattr(built, name)} -> {getattr(settings, name)}" for name in fixed
               if getattr(settings, name) != getattr(built, name)]
    if changed:
        raise CatomeError(f"{', '.join(changed)}: max_downsample, merge_crossattn and merge_mlp are built into the "
                          "graphs; rebuild the engine with catome-export build to change them")



class PartsBackend:
    """The backend of a runtime made from ready stage runners (:meth:`Runtime.from_parts`): it loads nothing."""

    name = "custom"

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def load_stage(self, engine_dir: Path, stage: StageRecord) -> StageRunner:
        raise CatomeError("this runtime was made from ready stage runners and loads no stage files: load an engine "
                          "folder with Runtime.load")

    def close(self) -> None:
        """Nothing to release: the runners belong to the runtime's chain."""


PARTS_TEXT_LEN = (1, 4096)
"""Text lengths the stand-in manifest of :func:`parts_manifest` admits (the runners decide what they take)."""


def parts_manifest(specs: Sequence[StageSpec], sites: Sequence[MergeSite], settings: MergeSettings,
                   unet_config: Mapping[str, Any], dtype: torch.dtype) -> Manifest:
    """The manifest of a runtime made from ready stage runners: their specs, sites and settings, shape ranges
    as wide as a build admits (the runners, and a ``shape_check`` if given, decide), the opt size the U-Net
    config's ``sample_size`` (diffusers' default image size), no model named (``model.id`` empty), no files."""
    latent = (1, MAX_RESOLUTION // 8)
    size = unet_config.get("sample_size")
    opt = min(max(int(size), 1), latent[1]) if isinstance(size, int) and not isinstance(size, bool) else 64
    shapes = ShapeRanges(batch=(1, MAX_BATCH), latent_height=latent, latent_width=latent, text_len=PARTS_TEXT_LEN,
                         opt_batch=1, opt_height=opt, opt_width=opt,
                         opt_text_len=min(max(DEFAULT_TEXT_LEN, PARTS_TEXT_LEN[0]), PARTS_TEXT_LEN[1]))
    return Manifest(name="parts", model=ModelRecord(id="", unet_config=dict(unet_config)),
                    precision="fp16" if dtype == torch.float16 else "fp32", merge=settings, sites=tuple(sites),
                    shapes=shapes, stages=tuple(StageRecord(spec=s, file=f"stage_{s.index}.onnx") for s in specs),
                    tools={})
