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
"""

from __future__ import annotations

import base64
import io
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catome_export.errors import CatomeError
from catome_export.defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS
from catome_export.serve.protocol import EngineLimits, ImageJob, RequestError, unet_rows

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGES = 8
"""Most images one request may ask for (``n``) unless the options say otherwise."""


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

    def __post_init__(self) -> None:
        for name, lo in (("max_batch", 1), ("steps", 1), ("max_images", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise CatomeError(f"{name} must be an integer >= {lo}, got {value!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise CatomeError(f"threads must be an integer >= 1, got {self.threads!r}")
        if self.backend_options is not None and not isinstance(self.backend_options, dict):
            raise CatomeError(f"backend_options must be a mapping, got {type(self.backend_options).__name__}")
        if isinstance(self.batch_wait_s, bool) or not isinstance(self.batch_wait_s, (int, float)) \
                or not 0 <= self.batch_wait_s <= 10:
            raise CatomeError(f"batch_wait_s must be a number of seconds in 0..10, got {self.batch_wait_s!r}")

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


def engine_batch_range(engine_dir: str | Path) -> tuple[int, int]:
    """The U-Net batch range an engine folder was built for (from its manifest), checked before any replica starts."""
    from catome_export.export.manifest import Manifest

    return Manifest.load(engine_dir, check_hashes=False).shapes.batch


def check_max_batch(max_batch: int, batch_range: tuple[int, int]) -> None:
    """CatomeError unless ``max_batch`` images fit the built batch range (one U-Net row per image without guidance)."""
    if max_batch > batch_range[1]:
        raise CatomeError(f"--max-batch {max_batch} is above the engine's built batch range "
                          f"{batch_range[0]}..{batch_range[1]} (images with guidance take two rows each): use "
                          f"--max-batch {batch_range[1]} or less, or rebuild the engine with --max-batch {max_batch}")


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


class _StepMarks:
    """``callback_on_step_end`` that counts steps (diffusers calls it once per denoising step)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        self.count += 1
        return {}


class ImageService:
    """A loaded engine and its pipeline; call from one thread (see the module docstring)."""

    def __init__(self, options: ServeOptions) -> None:
        from catome_export.workflows.generate import engine_resolution, pipeline_for_engine
        from catome_export.runtime import Runtime
        from catome_export.runtime.embed import attach

        self.options = options
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        backend_options = dict(options.backend_options or {})
        if options.threads is not None:
            backend_options.setdefault("intra_op_threads", options.threads)
        self.runtime = Runtime.load(options.engine_dir, backend=options.backend, device=options.device,
                                    backend_options=backend_options or None)
        try:
            manifest = self.runtime.manifest
            if manifest is None:
                raise CatomeError("the engine runtime has no manifest: load it with Runtime.load(engine folder)")
            shapes = manifest.shapes
            ranges = {"batch": shapes.batch, "latent_height": shapes.latent_height, "latent_width": shapes.latent_width}
            check_max_batch(options.max_batch, ranges["batch"])
            self.default_settings = self.runtime.settings
            self.limits = EngineLimits.from_ranges(
                ranges, default_size=engine_resolution(self.runtime), default_steps=options.steps,
                default_guidance=DEFAULT_GUIDANCE, max_images=options.max_images,
                threshold_allowed=self.default_settings.mode == "threshold")
            self.pipe = pipeline_for_engine(self.runtime)
            self.pipe.set_progress_bar_config(disable=True)
            self._attachment = attach(self.pipe, self.runtime)
        except BaseException:
            self.runtime.close()
            raise
        self._failure: str | None = None
        self._closed = False
        backend = getattr(self.runtime.backend, "name", "engine")
        logger.info("engine %s loaded on %s (%s): sizes %s, batch %d..%d, max %d images per call",
                    manifest.name, backend, self.runtime.device, self.limits.size_text(), *self.limits.batch,
                    options.max_batch)

    # -- health -----------------------------------------------------------------------
    def check_health(self) -> None:
        """CatomeError when the engine is unusable (closed, or a call failed for a reason other than the request)."""
        if self._closed:
            raise CatomeError("the engine was closed")
        if self._failure is not None:
            raise CatomeError(f"the engine failed and cannot be trusted: {self._failure}")

    def info(self) -> dict[str, Any]:
        """What clients may ask for: sizes, batch, defaults (``GET /v1/engine``)."""
        import os

        m = self.runtime.manifest
        return {"engine": m.name if m is not None else None, "model": m.model.id if m is not None else None,
                "precision": m.precision if m is not None else None,
                "backend": getattr(self.runtime.backend, "name", None), "device": str(self.runtime.device),
                "sizes": self.limits.size_text(), "default_size": f"{self.limits.default_size[1]}x"
                f"{self.limits.default_size[0]}", "unet_batch": list(self.limits.batch),
                "max_batch": self.options.max_batch, "max_images": self.limits.max_images,
                "default_steps": self.limits.default_steps, "threshold_allowed": self.limits.threshold_allowed,
                "merge": self.default_settings.to_dict(), "replica_pid": os.getpid()}

    # -- generation -------------------------------------------------------------------
    def chunk_size(self, job: ImageJob) -> int:
        """Images per pipeline call for jobs like ``job``: ``max_batch``, capped by the built batch range."""
        return max(1, min(self.options.max_batch, self.limits.batch[1] // unet_rows(job.guidance)))

    def run_jobs(self, jobs: list[ImageJob], enqueued: list[float] | None = None) -> list[ImageResult | Exception]:
        """Generate every job (grouped and chunked); one result or exception per job, in order."""
        enqueued = enqueued or [time.perf_counter()] * len(jobs)
        results: list[ImageResult | Exception | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.group_key(), []).append(i)
        for indices in groups.values():
            size = self.chunk_size(jobs[indices[0]])
            for start in range(0, len(indices), size):
                chunk = indices[start:start + size]
                try:
                    out = self._run_chunk([jobs[i] for i in chunk], [enqueued[i] for i in chunk])
                except Exception as exc:  # one result per job; the caller turns it into an HTTP answer
                    out = [exc] * len(chunk)
                for i, result in zip(chunk, out):
                    results[i] = result
        return [r if r is not None else CatomeError("internal: a job got no result") for r in results]

    def _settings_for(self, threshold: float | None) -> Any:
        if threshold is None:
            return self.default_settings
        return replace(self.default_settings, threshold=threshold, ratio=None, merge_fraction=None)

    def _run_chunk(self, jobs: list[ImageJob], enqueued: list[float]) -> list[ImageResult]:
        self.check_health()
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
        kwargs: dict[str, Any] = dict(
            prompt=[j.prompt for j in jobs],
            negative_prompt=None if all(n is None for n in negatives) else [n or "" for n in negatives],
            num_inference_steps=first.steps, guidance_scale=float(first.guidance), height=first.height,
            width=first.width, generator=[torch.Generator("cpu").manual_seed(j.seed) for j in jobs],
            output_type="np", callback_on_step_end=_StepMarks(),
        )
        start = time.perf_counter()
        try:
            with torch.no_grad():
                output = self.pipe(**kwargs)
            if self.runtime.device.type == "cuda":
                torch.cuda.synchronize(self.runtime.device)
        except Exception as exc:
            self._failure = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            logger.error("generation failed; the replica reports itself unhealthy: %s", self._failure)
            raise
        seconds = time.perf_counter() - start
        history = self.runtime.history
        sites = sorted(self.runtime.sites)
        merged = [[int(rec.merged.get(k, 0)) for k in sites] for rec in history]
        matched = [rec.step for rec in history if any(rec.matched.values())]
        step_ms = [float(rec.step_ms) for rec in history]
        images = output.images if hasattr(output, "images") else output[0]
        results = []
        for job, image, queued in zip(jobs, images, enqueued):
            pixels = np.clip(np.round(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
            results.append(ImageResult(png=png_bytes(pixels), seed=job.seed, batch_images=len(jobs), merged=merged,
                                       matched_steps=matched, queue_ms=(start - queued) * 1e3,
                                       generation_ms=seconds * 1e3, step_ms=step_ms))
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
