"""The Ray Serve deployment and application builder.

- :class:`ImageDeployment`: one replica holds one :class:`ImageService`
  (a Runtime and its pipeline). Every call into the service runs on one
  thread of the replica's own (a single-worker executor), so concurrent
  requests queue instead of reaching the runtime from two threads; the HTTP
  handler is async and batches image jobs with ``@serve.batch`` up to
  ``max_batch``.
- :func:`build_app`: the application for an engine folder and options, for
  ``serve.run(build_app({...}))`` or a Serve config file
  (``import_path: catome_export.serve.deployment:build_app``, ``args: {...}``).
  It pins the engine: the sha256 of its manifest.json goes into the options,
  and a replica whose folder holds another engine refuses to serve (it
  answers 503 and fails its health check).

Importing this module needs ``ray[serve]`` (``pip install "catome-export[serve]"``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from catome_export.errors import CatomeError
from catome_export.serve.protocol import ImageJob, RequestError, error_body, parse_request, render
from catome_export.serve.service import (EngineMismatch, ImageResult, ImageService, ServeOptions, check_max_batch,
                                         engine_batch_range, generation_answer, pin_engine)

logger = logging.getLogger(__name__)

GENERATIONS_PATH = "/v1/images/generations"
ENGINE_PATH = "/v1/engine"
DEPLOYMENT_NAME = "CatomeImages"
BATCH_LIMIT = 256
"""Upper bound of ``max_batch`` the batching decorator is declared with; each replica lowers it to its option."""


class _AsciiJSONResponse(JSONResponse):
    """JSON written by :func:`~catome_export.serve.protocol.render` (ASCII: a request's unencodable text, echoed in
    an error, cannot break the answer)."""

    def render(self, content: Any) -> bytes:
        return render(content)


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return _AsciiJSONResponse(body, status_code=status)


def _log_to_the_replica_file() -> None:
    """Inside a Serve replica: this package's log records (INFO and up) go to the replica's own Serve log file
    (``logs/serve/replica_*.log`` of the Ray session), beside Serve's lines; the replica's pid is there ("replica
    pid N: engine ... loaded", and every failure line), not in any response. Outside a replica (tests that make
    the deployment's class in-process) nothing changes."""
    try:
        serve.get_replica_context()
    except Exception:  # RayServeException: not in a replica
        return
    package = logging.getLogger("catome_export")
    for handler in logging.getLogger("ray.serve").handlers:
        if handler not in package.handlers:
            package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=32, health_check_period_s=5, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=5)
class ImageDeployment:
    """A replica: one engine, its pipeline, one runtime thread; answers the images API over HTTP."""

    def __init__(self, options: dict[str, Any]) -> None:
        _log_to_the_replica_file()
        self.options = ServeOptions.from_dict(options)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catome-runtime")
        self._service: ImageService | None = None
        self._refusal: str | None = None
        """Why this replica serves nothing (its folder holds another engine than the deployed one), or None."""
        try:
            # The service is built on the runtime thread too: the engine is only ever touched from that thread.
            self._service = self._executor.submit(ImageService, self.options).result()
        except EngineMismatch as exc:
            self._refusal = str(exc)
            logger.error("replica pid %d refuses to serve and fails its health checks: %s", os.getpid(), exc)
            return
        self.limits = self._service.limits
        # readiness: Serve routes to a replica once this constructor returns, so the warm-up runs here (a failed
        # warm-up fails the start, and Serve tries another replica); liveness is check_health, every 5 s
        try:
            self._executor.submit(self._service.warm_up).result()
        except BaseException:
            self._executor.submit(self._service.close).result()
            self._executor.shutdown(wait=True)
            self._service = None
            raise
        self._info = self._executor.submit(self._service.info).result()
        self.generate_batch.set_max_batch_size(self.options.max_batch)
        self.generate_batch.set_batch_wait_timeout_s(self.options.batch_wait_s)

    def _serving(self) -> ImageService:
        if self._service is None:
            raise CatomeError(self._refusal or "the replica has no engine")
        return self._service

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except Exception as exc:  # never Starlette's plain-text 500: the API's error shape, the cause in the log
            logger.exception("answering %s %s failed", request.method, request.url.path)
            return _json(error_body(f"the replica failed to answer ({type(exc).__name__}); retry the request",
                                    kind="server_error"), 500)

    async def _route(self, request: Request) -> Response:
        if self._refusal is not None:
            return _json(error_body("this replica was started on another engine than the application was deployed "
                                    "with and serves nothing (its log says more); retry the request",
                                    kind="server_error"), 503)
        path = request.url.path.rstrip("/") or "/"
        if path == GENERATIONS_PATH:
            if request.method != "POST":
                return _json(error_body(f"{request.method} {GENERATIONS_PATH} is not supported: use POST"), 405)
            return await self._generations(await request.body())
        if path == ENGINE_PATH and request.method == "GET":
            return _json(self._info)
        return _json(error_body(f"no such endpoint {request.method} {path}: use POST {GENERATIONS_PATH} "
                                f"(or GET {ENGINE_PATH})"), 404)

    async def _generations(self, body: bytes) -> Response:
        try:
            request = parse_request(body, self.limits)
        except RequestError as exc:
            return _json(error_body(str(exc), exc.param), exc.status)
        created = int(time.time())
        now = time.perf_counter()
        results = await asyncio.gather(*(self.generate_batch((job, now)) for job in request.jobs()))
        status, answer = generation_answer(list(results), created, self._serving().engine_sha256)
        return _json(answer, status)

    @serve.batch(max_batch_size=BATCH_LIMIT, batch_wait_timeout_s=0.01)
    async def generate_batch(self, items: list[tuple[ImageJob, float]]) -> list[ImageResult | Exception]:
        jobs = [job for job, _ in items]
        enqueued = [t for _, t in items]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._serving().run_jobs, jobs, enqueued)

    async def check_health(self) -> None:
        """Raises (and Serve replaces the replica) when the engine is unusable or not the deployed one."""
        self._serving().check_health()

    def __del__(self) -> None:
        executor = getattr(self, "_executor", None)
        service = getattr(self, "_service", None)
        if executor is None:
            return
        if service is not None:
            try:
                executor.submit(service.close).result(timeout=10)
            except Exception:  # the process is going away; nothing to report to
                pass
        executor.shutdown(wait=False)


def deployment_options(*, replicas: int | None = None, min_replicas: int | None = None,
                       max_replicas: int | None = None, gpus_per_replica: float | None = None,
                       target_ongoing_requests: float = 2.0, max_batch: int = 1) -> dict[str, Any]:
    """``.options(...)`` of the deployment: fixed replicas or autoscaling, a GPU per replica where there are GPUs."""
    out: dict[str, Any] = {}
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise CatomeError("give either replicas (a fixed count) or min_replicas/max_replicas (autoscaling), not both")
    if min_replicas is not None or max_replicas is not None:
        lo = 1 if min_replicas is None else min_replicas
        hi = max(lo, 1) if max_replicas is None else max_replicas
        if isinstance(lo, bool) or not isinstance(lo, int) or lo < 0:
            raise CatomeError(f"min_replicas must be an integer >= 0, got {lo!r}")
        if isinstance(hi, bool) or not isinstance(hi, int) or hi < max(lo, 1):
            raise CatomeError(f"max_replicas must be an integer >= max(1, min_replicas) = {max(lo, 1)}, got {hi!r}")
        out["autoscaling_config"] = {"min_replicas": lo, "initial_replicas": max(lo, 1), "max_replicas": hi,
                                     "target_ongoing_requests": target_ongoing_requests,
                                     "upscale_delay_s": 10, "downscale_delay_s": 300}
    else:
        count = 1 if replicas is None else replicas
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise CatomeError(f"replicas must be an integer >= 1, got {count!r}")
        out["num_replicas"] = count
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if _cluster_has_gpus() else 0.0
    out["ray_actor_options"] = {"num_gpus": gpus_per_replica, "num_cpus": 1}
    out["max_ongoing_requests"] = max(32, 4 * max_batch)
    return out


def _cluster_has_gpus() -> bool:
    import ray

    if not ray.is_initialized():
        return False
    return float(ray.cluster_resources().get("GPU", 0)) > 0


SCALING_ARGS = ("replicas", "min_replicas", "max_replicas", "gpus_per_replica", "target_ongoing_requests")


def app_options(args: dict[str, Any]) -> tuple[ServeOptions, dict[str, Any]]:
    """``build_app``'s args checked and split: the replicas' options, with the engine pinned
    (:func:`~catome_export.serve.service.pin_engine`), and the scaling arguments. Where the folder is on this
    machine its manifest and ``max_batch`` are checked too."""
    if not isinstance(args, dict):
        raise CatomeError(f"the application's args must be a mapping, got {type(args).__name__}")
    args = dict(args)
    scaling = {k: args.pop(k) for k in SCALING_ARGS if k in args}
    if "engine_dir" in args:
        args["engine_dir"] = str(Path(args["engine_dir"]).expanduser().resolve())
    options = ServeOptions.from_dict(args)
    if Path(options.engine_dir).exists():
        check_max_batch(options.max_batch, engine_batch_range(options.engine_dir))
    else:  # on a cluster the folder may live on the GPU machines only; each replica checks it when it loads
        logger.warning("engine folder %s is not on this machine: the replicas check it when they start",
                       options.engine_dir)
    return pin_engine(options), scaling


def build_app(args: dict[str, Any]) -> Any:
    """The Ray Serve application for ``args``: ServeOptions' fields (``engine_dir``, ``max_batch``, ``steps``,
    ``backend``, ``device``, ``threads``, ``max_images``, ``batch_wait_s``, ``engine_sha256``) plus ``replicas``
    or ``min_replicas``/``max_replicas``, ``gpus_per_replica`` and ``target_ongoing_requests``.

    Checks the engine folder and ``max_batch`` and pins the engine before any replica starts (:func:`app_options`).
    """
    options, scaling = app_options(args)
    logger.info("deploying engine %s (manifest sha256 %s)", options.engine_dir, options.engine_sha256)
    deployment = ImageDeployment.options(**deployment_options(max_batch=options.max_batch, **scaling))
    return deployment.bind(options.to_dict())
