"""One replica's work without Ray: a loaded engine and its pipeline, batched generation, health.

:class:`ImageService` holds one :class:`~catome_export.runtime.Runtime` and
the diffusers pipeline around it. It is not thread-safe (the runtime holds
one controller state): the Ray deployment creates it and calls every method
but :meth:`ImageService.check_health` on one thread of its own.

Batching: :meth:`ImageService.run_jobs` takes the jobs one batch window
collected, groups those that can share one pipeline call (same size, steps,
guidance scale and threshold) and runs each group in chunks of at most
``max_batch`` images that fit the engine's built batch range. CA-ToMe's r is
one number per U-Net batch (the paper's semantics), so an image generated in
a chunk of several can differ by a few pixel levels from the same request
alone; with ``max_batch=1`` every image equals a direct
:func:`catome_export.workflows.generate.generate` call with the same seed.

Engine identity: the application is deployed with the sha256 of the engine
folder's manifest.json (``ServeOptions.engine_sha256``, recorded by
:func:`catome_export.serve.deployment.build_app`); a replica checks it before it
loads anything and refuses another engine (:class:`EngineMismatch`). The hash
is in ``GET /v1/engine`` and in every answer's stats.

Faults: a request's own faults stay the request's. Validation
(:mod:`~catome_export.serve.protocol`, and the tokenizers here) refuses what it
can up front; the most steps a request may ask for comes from the pipeline's
scheduler (:func:`scheduler_step_limit`). When a pipeline call still fails, or
gives an image with NaN or infinite pixels, the replica runs a small check
generation that is known to work: if that works too, the engine is fine and
the request is answered 422 (each job of a shared call is retried alone first,
so that only the one at fault fails); only when the check fails as well is the
engine at fault, and the replica reports itself unhealthy.
"""

from __future__ import annotations

import base64
import copy
import io
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catome_export.checks import check_float, check_int
from catome_export.errors import CatomeError
from catome_export.featurecache import parse_feature_cache
from catome_export.defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS
from catome_export.serve.protocol import EngineLimits, ImageJob, RequestError, error_body, parse_request, unet_rows
from catome_export.workflows.generate import engine_resolution, pipeline_for_engine, run_pipeline, to_pixels

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGES = 8
"""Most images one request may ask for (``n``) unless the options say otherwise."""
STEP_LIMIT_DRY_RUNS = 8
"""Most step counts :func:`scheduler_step_limit` runs a scheduler through before it gives up."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
CHECK_PROMPT = "a photograph"
"""Prompt of the check generation that tells an engine fault from a request's (see the module docstring)."""


@dataclass(frozen=True)
class ServeOptions:
    """What a replica loads and how it batches; plain values, so Ray can ship them and a config file name them."""

    engine_dir: str
    """The engine folder (written by catome-export build), as the replicas' machines see it."""
    backend: str = "auto"
    """Runtime backend: auto, trt, ort, ort-cuda, ort-cpu or torch."""
    device: str | None = None
    """Device of the runtime (None: the backend's choice; cuda where the replica has a GPU)."""
    max_batch: int = 1
    """Most images per pipeline call (dynamic batching); 1 gives images identical to a direct call."""
    batch_wait_s: float = 0.01
    """How long a batch window waits for more requests."""
    steps: int = DEFAULT_STEPS
    """Denoising steps of a request that gives none."""
    max_images: int = DEFAULT_MAX_IMAGES
    """Most images (``n``) per request."""
    threads: int | None = None
    """torch and ONNX Runtime intra-op threads per replica (None: the libraries' defaults)."""
    backend_options: dict[str, Any] | None = None
    """Options for the backend (``Runtime.load(..., backend_options=...)``), e.g. ``{"cpu_mem_arena": False}``:
    ONNX Runtime's CPU arena keeps every buffer size it has met, and CA-ToMe's merge counts make new sizes, so a
    replica's memory creeps up over many requests with the arena on (see docs/serving.md)."""
    feature_cache: str | None = None
    """DeepCache-style feature caching of every generation: ``"I,b"``, ``"full:...;b"`` or ``"off"`` (None: the
    engine's own, set at build); its branch must be one the engine was cut for."""
    r_multiple: int | None = None
    """Round each merge site's r down to a multiple of this (``MergeSettings.r_multiple``; None: the engine's own,
    set at build). A replica then meets at most about N / q shapes per site of N tokens, which bounds the buffer
    sizes ONNX Runtime's CPU arena keeps with the arena on (see docs/serving.md)."""
    engine_sha256: str | None = None
    """sha256 (hex) of the engine folder's manifest.json the application was deployed with: a replica whose folder
    holds another engine refuses to serve (None: not pinned; ``build_app`` always pins it)."""

    def __post_init__(self) -> None:
        for name, value in (("max_batch", self.max_batch), ("steps", self.steps), ("max_images", self.max_images)):
            check_int(name, value, 1)
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        if self.backend_options is not None and not isinstance(self.backend_options, dict):
            raise CatomeError(f"backend_options must be a mapping, got {type(self.backend_options).__name__}")
        check_float("batch_wait_s", self.batch_wait_s, 0, 10, unit="seconds")
        if self.feature_cache is not None:
            if not isinstance(self.feature_cache, str):
                raise CatomeError(f"feature_cache must be a string like '3,0' or 'off', got {self.feature_cache!r}")
            parse_feature_cache(self.feature_cache)  # a bad value fails here, before any replica starts
        if self.r_multiple is not None:
            check_int("r_multiple", self.r_multiple, 1, hint="1: off")
        if self.engine_sha256 is not None and (not isinstance(self.engine_sha256, str)
                                               or _SHA256.fullmatch(self.engine_sha256) is None):
            raise CatomeError(f"engine_sha256 must be 64 lowercase hex digits (sha256sum ENGINE_DIR/manifest.json), "
                              f"got {self.engine_sha256!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ServeOptions":
        """From a Serve config file's ``args`` (unknown keys are an error naming the known ones)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise CatomeError(f"unknown serve option(s) {', '.join(unknown)}: known are {', '.join(sorted(known))}")
        if "engine_dir" not in data:
            raise CatomeError("engine_dir is missing: name the engine folder catome-export build wrote")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def manifest_sha256(engine_dir: str | Path) -> str:
    """sha256 (hex) of ``engine_dir/manifest.json``: the engine's identity, as the application pins it."""
    from catome_export.engine.manifest import MANIFEST_FILE
    from catome_export.fsutil import sha256_file

    folder = Path(engine_dir)
    if not folder.is_dir():
        raise CatomeError(f"engine folder {folder} does not exist: build it with catome-export build")
    path = folder / MANIFEST_FILE
    try:
        return sha256_file(path)
    except OSError as exc:
        raise CatomeError(f"cannot read {path} ({exc.strerror or type(exc).__name__}): serve a finished build "
                          "(catome-export build writes manifest.json last)") from None


class EngineMismatch(CatomeError):
    """The engine folder holds another engine than the application was deployed with."""


def check_engine_identity(engine_dir: str | Path, expected: str | None) -> str:
    """The folder's manifest hash; :class:`EngineMismatch` (naming both hashes and what to do) when it is not
    ``expected``."""
    actual = manifest_sha256(engine_dir)
    if expected is not None and actual != expected:
        raise EngineMismatch(
            f"engine folder {engine_dir} holds another engine than the application was deployed with: its "
            f"manifest.json has sha256 {actual}, the deployment pinned {expected}. The folder was changed after "
            "deployment; a served folder must never be rebuilt in place: build the new engine into a new folder and "
            "redeploy with that folder (docs/serving.md, \"Rolling out a new engine\")")
    return actual


def pin_engine(options: ServeOptions) -> ServeOptions:
    """``options`` with the engine pinned: ``engine_sha256`` is the sha256 of the folder's manifest.json.

    Where the folder is on this machine its hash is recorded (a given ``engine_sha256`` must match it). Where it
    is not (a cluster whose GPU machines alone hold it) the hash must be given, so that every replica can check it
    serves that engine.
    """
    if Path(options.engine_dir).exists():
        actual = manifest_sha256(options.engine_dir)
        if options.engine_sha256 not in (None, actual):
            raise CatomeError(f"engine_sha256 {options.engine_sha256} is not the engine in {options.engine_dir} "
                              f"(its manifest.json has sha256 {actual}): deploy the folder that holds the engine you "
                              "mean, or leave engine_sha256 out to pin the one there")
        return replace(options, engine_sha256=actual)
    if options.engine_sha256 is None:
        raise CatomeError(f"engine folder {options.engine_dir} is not on this machine, so its engine cannot be pinned "
                          "here: give engine_sha256 (--engine-sha256; sha256sum ENGINE_DIR/manifest.json on a machine "
                          "that has the folder), and every replica checks it serves that engine")
    return options


def check_feature_cache_option(engine_dir: str | Path, feature_cache: str | None) -> None:
    """CatomeError, before any replica starts, when ``feature_cache`` needs a branch the engine was not cut for."""
    if feature_cache is None:
        return
    from catome_export.engine.manifest import Manifest
    from catome_export.runtime.runtime import check_feature_cache

    check_feature_cache(Manifest.load(engine_dir, check_hashes=False).feature_cache, parse_feature_cache(feature_cache))


def engine_batch_range(engine_dir: str | Path) -> tuple[int, int]:
    """The U-Net batch range an engine folder was built for (from its manifest), checked before any replica starts."""
    from catome_export.engine.manifest import Manifest

    return Manifest.load(engine_dir, check_hashes=False).shapes.batch


def check_max_batch(max_batch: int, batch_range: tuple[int, int]) -> None:
    """CatomeError unless ``max_batch`` images fit the built batch range (one U-Net row per image without guidance)."""
    if max_batch > batch_range[1]:
        raise CatomeError(f"--max-batch {max_batch} is above the engine's built batch range "
                          f"{batch_range[0]}..{batch_range[1]} (images with guidance take two rows each): use "
                          f"--max-batch {batch_range[1]} or less, or rebuild the engine with --max-batch {max_batch}")


def scheduler_step_limit(scheduler: Any) -> int:
    """Most denoising steps ``scheduler`` runs, asked of copies of it (``scheduler`` itself is left as it is).

    Counts from its ``num_train_timesteps`` down: a count qualifies when a copy's ``set_timesteps`` gives
    timesteps inside the trained range ``0..num_train_timesteps - 1``, and a copy then steps through all of them
    (``scale_model_input`` and ``step`` on a one-element sample, as the pipeline's denoising loop calls them).
    PNDM with "leading" spacing and ``steps_offset`` 1 (Stable Diffusion 1.5's) runs 999: at 1000 its last
    timestep is 1000, past the 1000 trained ones, and its ``step`` fails with an IndexError.
    """
    name = type(scheduler).__name__
    total = int(getattr(scheduler.config, "num_train_timesteps", 0) or 0)
    if total < 1:
        raise CatomeError(f"the pipeline's {name} has no num_train_timesteps: cannot tell how many steps it runs")
    tried = 0
    for steps in range(total, 0, -1):
        if not _timesteps_in_range(scheduler, steps, total):
            continue
        if _steps_through(scheduler, steps):
            return steps
        tried += 1
        if tried >= STEP_LIMIT_DRY_RUNS:
            break
    raise CatomeError(f"the pipeline's {name} failed every step count tried (from {total} down to {steps}): it "
                      "cannot be served; use the model's own scheduler")


def _timesteps_in_range(scheduler: Any, steps: int, total: int) -> bool:
    trial = copy.deepcopy(scheduler)
    try:
        trial.set_timesteps(steps, device="cpu")
        timesteps = torch.as_tensor(trial.timesteps, dtype=torch.float64)
    except Exception:  # a count the scheduler refuses
        return False
    return bool(timesteps.numel() > 0 and torch.isfinite(timesteps).all() and timesteps.min() >= 0
                and timesteps.max() <= total - 1)


def _steps_through(scheduler: Any, steps: int) -> bool:
    trial = copy.deepcopy(scheduler)
    sample = torch.zeros(1, 1, 1, 1)
    try:
        trial.set_timesteps(steps, device="cpu")
        for t in trial.timesteps:
            model_input = trial.scale_model_input(sample, t)
            sample = trial.step(torch.zeros_like(model_input), t, sample, return_dict=False)[0]
    except Exception as exc:
        logger.debug("%s cannot run %d steps: %s: %s", type(scheduler).__name__, steps, type(exc).__name__, exc)
        return False
    return True


def _describe(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


class NonFiniteImage(CatomeError):
    """A pipeline call gave an image with NaN or infinite pixels (never encoded and answered as an image)."""


def _request_fault(exc: Exception) -> RequestError:
    """HTTP 422 for a generation that failed on its request's inputs while the engine worked."""
    if isinstance(exc, NonFiniteImage):
        return RequestError("the image came out with NaN or infinite pixels for this request, while a check "
                            "generation came out finite: lower guidance_scale, or change the prompt or seed",
                            status=422)
    return RequestError(f"the generation failed on this request's inputs ({_describe(exc)}), while a check "
                        "generation succeeded: change the request (prompt, negative_prompt, steps, guidance_scale, "
                        "size)", status=422)


@dataclass
class ImageResult:
    """One generated image with how it was made."""

    png: bytes
    seed: int
    batch_images: int
    """Images in the pipeline call that made it (they share r per site and step)."""
    merged: list[list[int]]
    """Per step: r (tokens merged away) per site, in site order."""
    matched_steps: list[int]
    """Steps at which some site recomputed its matching."""
    queue_ms: float
    """From the job entering the replica's batch to the start of its pipeline call."""
    generation_ms: float
    """Wall time of the pipeline call (text encoding, denoising, VAE decode)."""
    step_ms: list[float]
    """U-Net time per step (the runtime's own record)."""
    call: int = 0
    """Number of the pipeline call that made it, in this service (the images of one call share it)."""
    cached_steps: int = 0
    """U-Net calls of that pipeline call that ran only the feature cache's shallow branch."""

    def stats(self) -> dict[str, Any]:
        return {"seed": self.seed, "batch_images": self.batch_images, "merged": self.merged,
                "matched_steps": self.matched_steps, "queue_ms": round(self.queue_ms, 3),
                "generation_ms": round(self.generation_ms, 3), "step_ms": [round(t, 3) for t in self.step_ms]}

    def b64_png(self) -> str:
        return base64.b64encode(self.png).decode("ascii")


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 ``[H, W, 3]`` -> PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class ImageService:
    """A loaded engine and its pipeline; call from one thread (see the module docstring)."""

    def __init__(self, options: ServeOptions) -> None:
        from catome_export.engine.engine import Engine
        from catome_export.runtime import Runtime
        from catome_export.runtime.embed import attach

        self.options = options
        # the engine's identity, checked against the deployment's before anything is loaded
        self.engine_sha256 = check_engine_identity(options.engine_dir, options.engine_sha256)
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        backend_options = dict(options.backend_options or {})
        if options.threads is not None:
            backend_options.setdefault("intra_op_threads", options.threads)
        cache = "engine" if options.feature_cache is None else parse_feature_cache(options.feature_cache)
        engine = Engine.open(options.engine_dir)  # read and checked once, here
        settings = None
        if options.r_multiple is not None:  # the engine's own merge settings, r rounded as the options say
            settings = replace(engine.manifest.merge, r_multiple=options.r_multiple)
        self.runtime = Runtime.load(engine, backend=options.backend, device=options.device,
                                    backend_options=backend_options or None, feature_cache=cache, settings=settings)
        try:
            shapes = self.runtime.manifest.shapes
            ranges = {"batch": shapes.batch, "latent_height": shapes.latent_height, "latent_width": shapes.latent_width}
            check_max_batch(options.max_batch, ranges["batch"])
            self.default_settings = self.runtime.settings
            self.pipe = pipeline_for_engine(self.runtime)
            self.pipe.set_progress_bar_config(disable=True)
            scheduler = type(self.pipe.scheduler).__name__
            max_steps = scheduler_step_limit(self.pipe.scheduler)
            if options.steps > max_steps:
                raise CatomeError(f"--steps {options.steps} is more than the pipeline's {scheduler} runs "
                                  f"({max_steps}): use --steps {max_steps} or fewer")
            self.limits = EngineLimits.from_ranges(
                ranges, default_size=engine_resolution(self.runtime), default_steps=options.steps,
                max_steps=max_steps, default_guidance=DEFAULT_GUIDANCE, max_images=options.max_images,
                threshold_allowed=self.default_settings.mode == "threshold", scheduler=scheduler)
            self._check_job = self._make_check_job()
            self._attachment = attach(self.pipe, self.runtime)
        except BaseException:
            self.runtime.close()
            raise
        self._failure: str | None = None
        self._closed = False
        self._calls = 0
        self.warm_up_s: float | None = None
        """Seconds of the warm-up generation (None until :meth:`warm_up` ran)."""
        backend = self.runtime.backend.name
        logger.info("replica pid %d: engine %s loaded on %s (%s): manifest sha256 %s, sizes %s, batch %d..%d, max %d "
                    "images per call, 1..%d steps (%s)", os.getpid(), self.runtime.manifest.name, backend, self.runtime.device,
                    self.engine_sha256, self.limits.size_text(), *self.limits.batch, options.max_batch, max_steps,
                    scheduler)

    # -- health -----------------------------------------------------------------------
    def check_health(self) -> None:
        """CatomeError when the engine is unusable (closed, or a call failed for a reason other than the request)."""
        if self._closed:
            raise CatomeError("the engine was closed")
        if self._failure is not None:
            raise CatomeError(f"the engine failed and cannot be trusted: {self._failure}")

    def info(self) -> dict[str, Any]:
        """What clients may ask for: sizes, batch, defaults (``GET /v1/engine``)."""
        m = self.runtime.manifest
        cache = self.runtime.feature_cache
        return {"engine": m.name, "engine_sha256": self.engine_sha256,
                "feature_cache": None if cache is None else cache.to_dict(), "warm_up_s": self.warm_up_s,
                "model": m.model.id, "precision": m.precision,
                "backend": self.runtime.backend.name, "device": str(self.runtime.device),
                "sizes": self.limits.size_text(), "default_size": f"{self.limits.default_size[1]}x"
                f"{self.limits.default_size[0]}", "unet_batch": list(self.limits.batch),
                "max_batch": self.options.max_batch, "max_images": self.limits.max_images,
                "default_steps": self.limits.default_steps, "max_steps": self.limits.max_steps,
                "scheduler": self.limits.scheduler, "threshold_allowed": self.limits.threshold_allowed,
                "merge": self.default_settings.to_dict()}

    # -- generation -------------------------------------------------------------------
    def answer(self, body: bytes | str) -> tuple[int, dict[str, Any]]:
        """One request without Ray or batching windows: HTTP status and body, as the deployment answers it."""
        try:
            request = parse_request(body, self.limits)
        except RequestError as exc:
            return exc.status, error_body(str(exc), exc.param)
        return generation_answer(self.run_jobs(request.jobs()), int(time.time()), self.engine_sha256)

    def chunk_size(self, job: ImageJob) -> int:
        """Images per pipeline call for jobs like ``job``: ``max_batch``, capped by the built batch range."""
        return max(1, min(self.options.max_batch, self.limits.batch[1] // unet_rows(job.guidance)))

    def run_jobs(self, jobs: list[ImageJob], enqueued: list[float] | None = None) -> list[ImageResult | Exception]:
        """Generate every job (grouped and chunked); one result or exception per job, in order.

        A :class:`RequestError` is the job's own fault (HTTP 400 or 422, the replica stays healthy); any other
        exception is the engine's, and the replica then reports itself unhealthy.
        """
        enqueued = enqueued or [time.perf_counter()] * len(jobs)
        results: list[ImageResult | Exception | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            try:
                self._check_prompts(job)
            except RequestError as exc:
                results[i] = exc
                continue
            groups.setdefault(job.group_key(), []).append(i)
        for indices in groups.values():
            size = self.chunk_size(jobs[indices[0]])
            for start in range(0, len(indices), size):
                chunk = indices[start:start + size]
                out = self._run_guarded([jobs[i] for i in chunk], [enqueued[i] for i in chunk])
                for i, result in zip(chunk, out):
                    results[i] = result
        return [r if r is not None else CatomeError("internal: a job got no result") for r in results]

    def _check_prompts(self, job: ImageJob) -> None:
        """RequestError naming the field when a tokenizer of the pipeline cannot read a job's prompt text."""
        tokenizers = [t for t in (getattr(self.pipe, "tokenizer", None), getattr(self.pipe, "tokenizer_2", None))
                      if t is not None]
        for name, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
            if text is None:
                continue
            for tokenizer in tokenizers:
                try:  # as the pipeline's encode_prompt calls it: padded and truncated, and untruncated
                    tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                              return_tensors="pt")
                    tokenizer([text], padding="longest", return_tensors="pt")
                except Exception as exc:
                    raise RequestError(f"{name} cannot be tokenized ({_describe(exc)}): send plain Unicode text",
                                       name) from None

    def _run_guarded(self, jobs: list[ImageJob], enqueued: list[float]) -> list[ImageResult | Exception]:
        """One pipeline call for ``jobs``; a failure is told to be the request's or the engine's (module docstring)."""
        try:
            self.check_health()
        except CatomeError as exc:
            return [exc] * len(jobs)
        try:
            images: list[ImageResult | Exception] = list(self._run_chunk(jobs, enqueued))
            return images
        except RequestError as exc:
            return [exc] * len(jobs)
        except Exception as exc:  # one result per job; the caller turns it into an HTTP answer
            fault = exc
        if not self._engine_works(fault):
            return [fault] * len(jobs)
        if len(jobs) > 1:  # the engine works: run each job alone, so that only the one at fault fails
            return [result for job, queued in zip(jobs, enqueued) for result in self._run_guarded([job], [queued])]
        return [_request_fault(fault)]

    def warm_up(self) -> float:
        """One small generation at the default size (2 steps), so the first client request does not pay for the
        engine's first run (ONNX Runtime's and TensorRT's allocations, kernel selection); seconds it took.
        CatomeError when it fails: the replica never reports ready."""
        lo, hi = self.limits.batch
        guidance = next(g for g in (self.limits.default_guidance, 7.5, 1.0) if lo <= unet_rows(g) <= hi)
        height, width = self.limits.default_size
        job = ImageJob(CHECK_PROMPT, None, 0, min(2, self.limits.max_steps), guidance, height, width, None)
        start = time.perf_counter()
        try:
            self._run_chunk([job], [start])
        except Exception as exc:
            raise CatomeError(f"the warm-up generation failed ({_describe(exc)}): the replica does not start") from exc
        self.warm_up_s = time.perf_counter() - start
        logger.info("replica pid %d: warm-up generation took %.2f s", os.getpid(), self.warm_up_s)
        return self.warm_up_s

    def _make_check_job(self) -> ImageJob:
        """A small generation known to work on a sound engine: the smallest built size, two steps, no threshold."""
        lo, hi = self.limits.batch
        guidance = next(g for g in (self.limits.default_guidance, 7.5, 1.0) if lo <= unet_rows(g) <= hi)
        return ImageJob(CHECK_PROMPT, None, 0, min(2, self.limits.max_steps), guidance, self.limits.height[0],
                        self.limits.width[0], None)

    def _engine_works(self, fault: Exception) -> bool:
        """After ``fault``: does the check generation work (the fault was the request's)? If not, the engine is
        marked failed (:meth:`check_health` raises from now on)."""
        try:
            self._run_chunk([self._check_job], [time.perf_counter()])
        except Exception as exc:
            self._failure = _describe(fault)
            logger.error("generation failed and so did a check generation (%s); replica pid %d reports itself "
                         "unhealthy: %s", _describe(exc), os.getpid(), self._failure)
            return False
        logger.warning("a request's generation failed on its inputs (%s); a check generation succeeded, so replica "
                       "pid %d keeps serving", _describe(fault), os.getpid())
        return True

    def _settings_for(self, threshold: float | None) -> Any:
        if threshold is None:
            return self.default_settings
        return replace(self.default_settings, threshold=threshold, ratio=None, merge_fraction=None)

    def _run_chunk(self, jobs: list[ImageJob], enqueued: list[float]) -> list[ImageResult]:
        first = jobs[0]
        try:
            settings = self._settings_for(first.threshold)
            if settings != self.runtime.settings:
                self.runtime.set_settings(settings)
            # The same checks the CLI makes, so a request the limits let through never reaches a graph wrongly.
            self.runtime.shape_check(unet_rows(first.guidance) * len(jobs), first.height // 8, first.width // 8)
        except CatomeError as exc:
            raise RequestError(str(exc)) from None
        negatives = [j.negative_prompt for j in jobs]
        run = run_pipeline(
            self.pipe, device=self.runtime.device, prompt=[j.prompt for j in jobs],
            negative_prompt=None if all(n is None for n in negatives) else [n or "" for n in negatives],
            num_inference_steps=first.steps, guidance_scale=float(first.guidance), height=first.height,
            width=first.width, generator=[torch.Generator("cpu").manual_seed(j.seed) for j in jobs],
        )
        start, seconds, images = run.start, run.seconds, run.images
        logger.info("replica pid %d: %d image(s) %dx%d, %d steps in %.2f s", os.getpid(), len(jobs), first.width,
                    first.height, first.steps, seconds)
        if not np.isfinite(images).all():  # NaN would be cast to black pixels: never answer it as an image
            raise NonFiniteImage(f"{int((~np.isfinite(images)).sum())} of {images.size} pixel values are NaN or "
                                  "infinite")
        history = self.runtime.history
        sites = sorted(self.runtime.sites)
        merged = [[int(rec.merged.get(k, 0)) for k in sites] for rec in history]
        matched = [rec.step for rec in history if any(rec.matched.values())]
        step_ms = [float(rec.step_ms) for rec in history]
        cached_steps = sum(1 for rec in history if rec.cached_features)
        self._calls += 1
        results = []
        for job, image, queued in zip(jobs, images, enqueued):
            results.append(ImageResult(png=png_bytes(to_pixels(image)), seed=job.seed, batch_images=len(jobs), merged=merged,
                                       matched_steps=matched, queue_ms=(start - queued) * 1e3,
                                       generation_ms=seconds * 1e3, step_ms=step_ms, call=self._calls,
                                       cached_steps=cached_steps))
        return results

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._attachment.detach()
        finally:
            self.runtime.close()


def generation_answer(results: list[ImageResult | Exception], created: int,
                      engine_sha256: str) -> tuple[int, dict[str, Any]]:
    """HTTP status and body for a request's job results: the images (their stats naming the engine by its manifest
    hash), or the first job's error (a :class:`RequestError` with its own status; any other exception an engine
    failure, 500)."""
    for result in results:
        if isinstance(result, RequestError):
            return result.status, error_body(str(result), result.param)
        if isinstance(result, Exception):
            logger.error("a generation failed in replica pid %d: %s", os.getpid(), _describe(result))
            return 500, error_body(f"the engine failed ({type(result).__name__}); retry the request",
                                   kind="server_error")
    images = [r for r in results if isinstance(r, ImageResult)]
    return 200, {"created": created, "data": [{"b64_json": r.b64_png()} for r in images],
                 "catome": {"engine_sha256": engine_sha256, "images": [r.stats() for r in images]}}
