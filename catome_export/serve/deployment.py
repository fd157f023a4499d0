"""The Ray Serve deployments and the application builder.

- :class:`Ingress`: what Serve's HTTP proxy calls; one light replica (no GPU, no engine) that forwards every request
  to the image deployment through a DeploymentHandle and turns what can go wrong on the way into the API's JSON
  errors: a full queue (429), a request older than the request timeout (504), an image replica lost before it
  answered (503, or one more try for a request that names its seed), a stopping service (503). Serve's proxy would
  answer those itself, in plain text (or, for a lost replica, an empty 500).
- :class:`ImageDeployment`: one replica holds one :class:`ImageService`
  (a Runtime and its pipeline). Every call into the service runs on one
  thread of the replica's own (a single-worker executor), so concurrent
  requests queue instead of reaching the runtime from two threads; its
  handler is async and batches image jobs with ``@serve.batch`` up to
  ``max_batch``.
- :func:`build_app`: the application for an engine folder and options, for
  ``serve.run(build_app({...}))`` or a Serve config file
  (``import_path: catome_export.serve.deployment:build_app``, ``args: {...}``).
  It pins the engine: the sha256 of its manifest.json goes into the options,
  and a replica whose folder holds another engine refuses to serve (it
  answers 503 and fails its health check).

Backpressure is Serve's own: each image replica takes at most ``max_ongoing_requests`` requests at a time, and the
ingress's handle holds at most ``max_queued_requests`` more waiting for a free replica; beyond that the handle raises
BackPressureError, answered 429 with ``Retry-After``. A request whose client disconnects, or that times out, has its
image call cancelled: dropped from the handle's queue, or from the replica's batch queue (a pipeline call already
running finishes, and its result is dropped).

Importing this module needs ``ray[serve]`` (``pip install "catome-export[serve]"``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from catome_export.checks import check_float, check_int, is_int
from catome_export.errors import CatomeError
from catome_export.serve.metrics import IngressMetrics, ReplicaMetrics, in_a_replica, outcome_of
from catome_export.serve.protocol import ImageJob, RequestError, error_body, parse_request, render
from catome_export.serve.service import (EngineMismatch, ImageResult, ImageService, ServeOptions, check_max_batch,
                                         engine_batch_range, generation_answer, pin_engine)

logger = logging.getLogger(__name__)

GENERATIONS_PATH = "/v1/images/generations"
ENGINE_PATH = "/v1/engine"
DEPLOYMENT_NAME = "CatomeImages"
INGRESS_NAME = "CatomeIngress"
RETRY_AFTER_S = 5
"""``Retry-After`` (seconds) of a 429 (queue full) and a 503 (replica lost, service stopping)."""
DEFAULT_MAX_QUEUED = 32
"""Requests the ingress holds waiting for a free image replica before it answers 429."""
DEFAULT_REQUEST_TIMEOUT_S = 300.0
"""Seconds from a request's arrival at the ingress to its answer, after which it is answered 504."""
BATCH_LIMIT = 256
"""Upper bound of ``max_batch`` the batching decorator is declared with; each replica lowers it to its option."""


def _json(content: bytes, status: int = 200, retry_after_s: float | None = None) -> Response:
    """A JSON answer from bytes :func:`~catome_export.serve.protocol.render` wrote (ASCII: a request's unencodable
    text, echoed in an error, cannot break the answer)."""
    headers = None if retry_after_s is None else {"Retry-After": str(max(0, math.ceil(retry_after_s)))}
    return Response(content, status_code=status, media_type="application/json", headers=headers)


def _error(status: int, message: str, code: str | None = None, retry_after_s: float | None = None) -> Response:
    return _json(render(error_body(message, kind="server_error", code=code)), status, retry_after_s)


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


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=2, health_check_period_s=5, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=5)
class ImageDeployment:
    """A replica: one engine, its pipeline, one runtime thread; answers the images API's requests as the
    :class:`Ingress` forwards them (:meth:`respond`)."""

    def __init__(self, options: dict[str, Any]) -> None:
        _log_to_the_replica_file()
        self.options = ServeOptions.from_dict(options)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catome-runtime")
        self._service: ImageService | None = None
        self._metrics = ReplicaMetrics() if in_a_replica() else None
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

    async def respond(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        """One HTTP request, as the ingress forwards it: its status and JSON body (rendered, ASCII)."""
        try:
            status, answer = await self._route(method, path, body)
        except Exception as exc:  # never a bare failure: the API's error shape, the cause in the log
            logger.exception("answering %s %s failed", method, path)
            status, answer = 500, error_body(f"the replica failed to answer ({type(exc).__name__}); retry the "
                                             "request", kind="server_error")
        return status, render(answer)

    async def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if self._refusal is not None:
            return 503, error_body("this replica was started on another engine than the application was deployed "
                                   "with and serves nothing (its log says more); retry the request",
                                   kind="server_error")
        path = path.rstrip("/") or "/"
        if path == GENERATIONS_PATH:
            if method != "POST":
                return 405, error_body(f"{method} {GENERATIONS_PATH} is not supported: use POST")
            return await self._generations(body)
        if path == ENGINE_PATH and method == "GET":
            return 200, self._info
        return 404, error_body(f"no such endpoint {method} {path}: use POST {GENERATIONS_PATH} (or GET {ENGINE_PATH})")

    async def _generations(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            request = parse_request(body, self.limits)
        except RequestError as exc:
            return exc.status, error_body(str(exc), exc.param)
        created = int(time.time())
        now = time.perf_counter()
        # cancelled with this call (the client went away, or the request timed out): jobs still in the batch queue
        # are dropped from it
        results = await asyncio.gather(*(self.generate_batch((job, now)) for job in request.jobs()))
        return generation_answer(list(results), created, self._serving().engine_sha256)

    @serve.batch(max_batch_size=BATCH_LIMIT, batch_wait_timeout_s=0.01)
    async def generate_batch(self, items: list[tuple[ImageJob, float]]) -> list[ImageResult | Exception]:
        jobs = [job for job, _ in items]
        enqueued = [t for _, t in items]
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self._serving().run_jobs, jobs, enqueued)
        if self._metrics is not None:
            self._metrics.record(results)
        return results

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


class _TimedOut(Exception):
    """The request is older than the request timeout."""


class _Aborted(Exception):
    """The service is stopping and its drain timeout has passed."""


def _replica_lost(exc: BaseException) -> bool:
    """Whether a handle call failed because its image replica went away (died, was killed or stopped) before it
    answered: Ray raises an actor error for that, sometimes wrapped in a task error."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    lost = (RayActorError, ReplicaUnavailableError)
    return isinstance(exc, lost) or isinstance(getattr(exc, "cause", None), lost)


def names_a_seed(method: str, body: bytes) -> bool:
    """Whether a request may be sent again after its replica was lost: a GET, or a generation that names its seed
    (the same images whichever replica makes them; a request without a seed is not sent twice)."""
    if method == "GET":
        return True
    try:
        data = json.loads(body)
    except (ValueError, RecursionError, TypeError):
        return False
    return isinstance(data, dict) and data.get("seed") is not None


@serve.deployment(name=INGRESS_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                  graceful_shutdown_timeout_s=5)
class Ingress:
    """The HTTP front of the application: forwards each request to the image deployment and answers in the API's
    shape whatever befalls it on the way (the module docstring lists the cases).

    ``drain`` (the command line calls it on Ctrl-C or SIGTERM) makes it answer every new request 503; ``in_flight``
    says how many requests are still being answered; ``abort`` answers those 503 at once (the drain timeout)."""

    def __init__(self, images: Any, request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 retry_after_s: float = RETRY_AFTER_S) -> None:
        _log_to_the_replica_file()
        self._images = images
        self.request_timeout_s = float(request_timeout_s)
        self.retry_after_s = float(retry_after_s)
        self._draining = False
        self._abort = asyncio.Event()
        self._in_flight = 0
        self._metrics = IngressMetrics() if in_a_replica() else None

    async def __call__(self, request: Request) -> Response:
        arrived = time.monotonic()
        if self._draining:
            self._count("shutting_down")
            return _error(503, "the service is stopping and takes no new requests; retry the request",
                          "shutting_down", self.retry_after_s)
        self._in_flight += 1
        outcome = "disconnected"  # unless an answer comes: Serve cancels this call when the client goes away
        try:
            body = await request.body()
            response, outcome = await self._forward(request.method, request.url.path, body,
                                                    arrived + self.request_timeout_s)
            return response
        finally:
            self._in_flight -= 1
            self._count(outcome)

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.request(outcome)

    async def _forward(self, method: str, path: str, body: bytes, deadline: float) -> tuple[Response, str]:
        """The answer and its outcome (:data:`~catome_export.serve.metrics.OUTCOMES`)."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        tries = 0
        while True:
            tries += 1
            try:
                status, content = await self._within(self._images.respond.remote(method, path, body), deadline)
                return _json(content, status), outcome_of(status)
            except BackPressureError:
                return _error(429, "every replica is busy and the queue of waiting requests is full; retry the "
                                   "request later", "queue_full", self.retry_after_s), "queue_full"
            except _TimedOut:
                return _error(504, f"the request was not answered within the service's request timeout "
                                   f"({self.request_timeout_s:g} s) and was dropped; retry it later, or with fewer "
                                   "images or steps", "timeout"), "timeout"
            except _Aborted:
                return _error(503, "the service stopped before this request was answered; retry the request",
                              "shutting_down", self.retry_after_s), "shutting_down"
            except DeploymentUnavailableError:
                return _error(503, "the image deployment is unavailable (it failed to start; the service's log "
                                   "says more); retry the request later", "unavailable",
                              self.retry_after_s), "unavailable"
            except Exception as exc:
                if not _replica_lost(exc):
                    logger.exception("forwarding %s %s failed", method, path)
                    return _error(500, f"the service failed to answer ({type(exc).__name__}); retry the "
                                       "request"), "error"
                if tries == 1 and deadline > time.monotonic() and names_a_seed(method, body):
                    logger.warning("the replica answering %s %s was lost (%s); sending the request once more",
                                   method, path, type(exc).__name__)
                    if self._metrics is not None:
                        self._metrics.resend()
                    continue
                logger.warning("the replica answering %s %s was lost (%s)", method, path, type(exc).__name__)
                return _error(503, "the replica that was answering this request stopped before it answered; "
                                   "retry the request", "replica_lost", self.retry_after_s), "replica_lost"

    async def _within(self, response: Any, deadline: float) -> Any:
        """The handle call's result, unless the deadline passes or the drain is aborted first; on either, or when
        this request is cancelled (its client went away), the call is cancelled: dropped from the queue it waits
        in."""

        async def result() -> Any:
            return await response

        answer = asyncio.ensure_future(result())
        aborted = asyncio.ensure_future(self._abort.wait())
        try:
            done, _ = await asyncio.wait({answer, aborted}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            response.cancel()
            answer.cancel()
            raise
        finally:
            aborted.cancel()
        if answer in done:
            return answer.result()
        response.cancel()
        answer.cancel()
        raise _Aborted() if self._abort.is_set() else _TimedOut()

    async def drain(self) -> int:
        """From now on every new request is answered 503; the number of requests in flight."""
        self._draining = True
        return self._in_flight

    async def in_flight(self) -> int:
        return self._in_flight

    async def abort(self) -> int:
        """Answers every request in flight 503 now; how many there were."""
        self._draining = True
        self._abort.set()
        return self._in_flight


def default_max_ongoing(max_batch: int) -> int:
    """Requests one image replica takes at a time unless told otherwise: two batches' worth, so that the next batch
    gathers while one runs (one replica per GPU)."""
    return 2 * max_batch


def check_limits(max_ongoing_requests: Any = None, max_queued_requests: Any = None,
                 request_timeout_s: Any = None) -> None:
    """CatomeError, naming the option, unless each limit given is usable: max_ongoing_requests >= 1,
    max_queued_requests >= 1 or -1 (no limit), request_timeout_s > 0 (None: not given)."""
    if max_ongoing_requests is not None:
        check_int("max_ongoing_requests", max_ongoing_requests, 1)
    if max_queued_requests is not None and not (is_int(max_queued_requests) and max_queued_requests == -1):
        check_int("max_queued_requests", max_queued_requests, 1, hint="or -1 for no limit")
    if request_timeout_s is not None:
        check_float("request_timeout_s", request_timeout_s, 0, lo_open=True, unit="seconds")


def deployment_options(*, replicas: int | None = None, min_replicas: int | None = None,
                       max_replicas: int | None = None, gpus_per_replica: float | None = None,
                       target_ongoing_requests: float = 2.0, max_batch: int = 1,
                       max_ongoing_requests: int | None = None,
                       max_queued_requests: int = DEFAULT_MAX_QUEUED) -> dict[str, Any]:
    """``.options(...)`` of the image deployment: fixed replicas or autoscaling, a GPU per replica where there are
    GPUs, and Serve's backpressure (``max_ongoing_requests`` per replica, default :func:`default_max_ongoing`;
    ``max_queued_requests`` waiting at the ingress's handle)."""
    out: dict[str, Any] = {}
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise CatomeError("give either replicas (a fixed count) or min_replicas/max_replicas (autoscaling), not both")
    if min_replicas is not None or max_replicas is not None:
        lo = 1 if min_replicas is None else min_replicas
        hi = max(lo, 1) if max_replicas is None else max_replicas
        check_int("min_replicas", lo, 0)
        check_int("max_replicas", hi, max(lo, 1), hint="max(1, min_replicas)")
        out["autoscaling_config"] = {"min_replicas": lo, "initial_replicas": max(lo, 1), "max_replicas": hi,
                                     "target_ongoing_requests": target_ongoing_requests,
                                     "upscale_delay_s": 10, "downscale_delay_s": 300}
    else:
        count = 1 if replicas is None else replicas
        out["num_replicas"] = check_int("replicas", count, 1)
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if _cluster_has_gpus() else 0.0
    out["ray_actor_options"] = {"num_gpus": gpus_per_replica, "num_cpus": 1}
    check_limits(max_ongoing_requests, max_queued_requests)
    out["max_ongoing_requests"] = default_max_ongoing(max_batch) if max_ongoing_requests is None \
        else max_ongoing_requests
    out["max_queued_requests"] = max_queued_requests
    return out


def _cluster_has_gpus() -> bool:
    import ray

    if not ray.is_initialized():
        return False
    return float(ray.cluster_resources().get("GPU", 0)) > 0


SCALING_ARGS = ("replicas", "min_replicas", "max_replicas", "gpus_per_replica", "target_ongoing_requests",
                "max_ongoing_requests", "max_queued_requests")
INGRESS_ARGS = ("request_timeout_s",)


def app_options(args: dict[str, Any]) -> tuple[ServeOptions, dict[str, Any]]:
    """``build_app``'s args checked and split: the replicas' options, with the engine pinned
    (:func:`~catome_export.serve.service.pin_engine`), and the deployment's arguments (scaling and limits:
    :data:`SCALING_ARGS`, :data:`INGRESS_ARGS`). Where the folder is on this machine its manifest and ``max_batch``
    are checked too."""
    if not isinstance(args, dict):
        raise CatomeError(f"the application's args must be a mapping, got {type(args).__name__}")
    args = dict(args)
    scaling = {k: args.pop(k) for k in SCALING_ARGS + INGRESS_ARGS if k in args}
    check_limits(scaling.get("max_ongoing_requests"), scaling.get("max_queued_requests"),
                 scaling.get("request_timeout_s"))
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
    or ``min_replicas``/``max_replicas``, ``gpus_per_replica``, ``target_ongoing_requests``, and the limits
    ``max_ongoing_requests`` (per replica; default twice ``max_batch``), ``max_queued_requests`` (default
    :data:`DEFAULT_MAX_QUEUED`; -1: no limit) and ``request_timeout_s`` (default :data:`DEFAULT_REQUEST_TIMEOUT_S`).

    Checks the engine folder, ``max_batch`` and the limits and pins the engine before any replica starts
    (:func:`app_options`). HTTP reaches the :class:`Ingress`, which calls the image deployment.
    """
    options, scaling = app_options(args)
    timeout = scaling.pop("request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S)
    logger.info("deploying engine %s (manifest sha256 %s)", options.engine_dir, options.engine_sha256)
    images = ImageDeployment.options(**deployment_options(max_batch=options.max_batch, **scaling))
    return Ingress.bind(images.bind(options.to_dict()), request_timeout_s=timeout)  # type: ignore[attr-defined]
