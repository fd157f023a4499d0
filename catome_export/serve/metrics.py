"""Prometheus metrics of the service, recorded through Ray Serve's metrics API (``ray.serve.metrics``).

Ray's metrics agent on each node exports them, in Prometheus' text format, at
``http://NODE:PORT/metrics`` (the node's ``MetricsExportPort``; ``catome-export serve`` prints the URL of a local
Ray, and ``--metrics-port`` fixes the port), each named ``ray_`` + the name below and tagged with Serve's
``application``, ``deployment`` and ``replica``. A record reaches the export within about ten seconds. A replica's
series end with its process (a replaced replica starts from zero, as Prometheus counters do).

The ingress (every request, whatever became of it):

- ``catome_requests_total`` (counter, tag ``outcome``): ``ok`` (2xx), ``invalid`` (4xx from the replica: a bad
  request, or a generation that failed on its own inputs), ``failed`` (5xx from the replica), ``queue_full`` (429),
  ``timeout`` (504), ``replica_lost``, ``shutting_down`` and ``unavailable`` (503), ``error`` (the ingress's own
  500), ``disconnected`` (the client went away first).
- ``catome_resent_requests_total`` (counter): requests sent once more after their replica was lost.

Each image replica (one record per image, or per pipeline call, or per U-Net call and merge site):

- ``catome_images_total`` (counter): images generated.
- ``catome_queue_seconds`` (histogram, per image): from entering the replica's batch queue to its pipeline call.
- ``catome_generation_seconds`` (histogram, per pipeline call): text encoding, denoising and decoding.
- ``catome_steps`` (histogram, per pipeline call): denoising steps.
- ``catome_batch_images`` (histogram, per pipeline call): images the call made together.
- ``catome_merged_tokens`` (histogram, per U-Net call and merge site, tag ``site``): r, the tokens merged away.
- ``catome_unet_calls_total`` and ``catome_feature_cached_steps_total`` (counters): U-Net calls, and those of
  them that ran only the feature cache's shallow branch (DeepCache's cached steps).
"""

from __future__ import annotations

from typing import Any

SECONDS_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
STEPS_BUCKETS = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0, 200.0, 500.0, 1000.0]
BATCH_BUCKETS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
TOKENS_BUCKETS = [1.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0]

OUTCOMES = ("ok", "invalid", "failed", "queue_full", "timeout", "replica_lost", "shutting_down", "unavailable",
            "error", "disconnected")


def in_a_replica() -> bool:
    """Whether this code runs in a Serve replica (where Ray exports what is recorded)."""
    try:
        from ray import serve

        serve.get_replica_context()
    except Exception:  # RayServeException: not in a replica (a test that makes a deployment's class in-process)
        return False
    return True


def outcome_of(status: int) -> str:
    """The outcome of a request a replica answered with ``status``."""
    return "ok" if status < 400 else "invalid" if status < 500 else "failed"


class IngressMetrics:
    def __init__(self) -> None:
        from ray.serve.metrics import Counter

        self.requests = Counter("catome_requests_total", description="Requests, by what became of them.",
                                tag_keys=("outcome",))
        self.resent = Counter("catome_resent_requests_total",
                              description="Requests sent once more after their replica was lost.")

    def request(self, outcome: str) -> None:
        self.requests.inc(1, tags={"outcome": outcome})

    def resend(self) -> None:
        self.resent.inc(1)


class ReplicaMetrics:
    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.images = Counter("catome_images_total", description="Images generated.")
        self.queue = Histogram("catome_queue_seconds", description="Per image: seconds from entering the replica's "
                               "batch queue to the start of its pipeline call.", boundaries=SECONDS_BUCKETS)
        self.generation = Histogram("catome_generation_seconds", description="Per pipeline call: seconds of text "
                                    "encoding, denoising and decoding.", boundaries=SECONDS_BUCKETS)
        self.steps = Histogram("catome_steps", description="Per pipeline call: denoising steps.",
                               boundaries=STEPS_BUCKETS)
        self.batch = Histogram("catome_batch_images", description="Per pipeline call: images made together.",
                               boundaries=BATCH_BUCKETS)
        self.merged = Histogram("catome_merged_tokens", description="Per U-Net call and merge site: r, the tokens "
                                "merged away.", boundaries=TOKENS_BUCKETS, tag_keys=("site",))
        self.unet_calls = Counter("catome_unet_calls_total", description="U-Net calls.")
        self.cached = Counter("catome_feature_cached_steps_total", description="U-Net calls that ran only the "
                              "feature cache's shallow branch (DeepCache's cached steps).")

    def record(self, results: list[Any]) -> None:
        """The images of one batch (:class:`~catome_export.serve.service.ImageResult`; exceptions are skipped):
        per image, and once per pipeline call for what the images of a call share."""
        calls: dict[int, Any] = {}
        for result in results:
            if isinstance(result, BaseException):
                continue
            self.images.inc(1)
            self.queue.observe(max(0.0, result.queue_ms / 1e3))
            calls.setdefault(result.call, result)
        for result in calls.values():
            self.generation.observe(result.generation_ms / 1e3)
            self.steps.observe(len(result.step_ms))
            self.batch.observe(result.batch_images)
            if result.step_ms:
                self.unet_calls.inc(len(result.step_ms))
            if result.cached_steps:
                self.cached.inc(result.cached_steps)
            for per_site in result.merged:
                for site, r in enumerate(per_site):
                    self.merged.observe(r, tags={"site": str(site)})
