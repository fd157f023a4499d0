"""Load and reliability test of ``catome-export serve`` on this machine, isolated from the network.

Starts a local Ray and Serve (in a network namespace with only loopback and
its own PID namespace: the script re-runs itself under ``unshare`` unless it
already is in one; needs root), deploys the engine with the limits given
(``--max-ongoing-requests``, ``--max-queued-requests``, ``--request-timeout``:
the deployment's own options, defaults as ``catome-export serve``'s), and then:

1. Load: ``--concurrency`` clients send requests, ``--requests`` of them or for
   ``--duration`` seconds; with ``--bad-every N`` every N-th is a bad body,
   cycling through all of ``BAD_REQUESTS`` (catome_export/serve/loadtest.py:
   malformed and out-of-range fields, a lone surrogate in ``prompt`` and in
   ``negative_prompt``, steps 1000, guidance 1e30 and 1e308, a 5000-digit
   integer, 100 000-deep nesting, bad UTF-8). Good requests: answered, shed
   (429/503 in the API's shape, with the configured limits beside them) and
   failed (anything else: the load's ``errors``), p50/p99/max latency of those
   answered; bad ones: every case's statuses, and any not answered 4xx; every
   answer not in the API's shape; the replicas' states and ``/-/healthz`` after
   the load; the ingress's request metrics over the load (by outcome, and the
   images) against the clients' counts; the resident memory of every replica
   sampled over time (growth from the end of the first fifth of the load).
2. ``--check-direct``: one request at batch 1 against a direct call
   (Runtime + pipeline + ``generate``) in this process: identical pixels?
3. ``--bad-requests``: each bad body once: HTTP 400 with OpenAI's error shape,
   and the replica answers the next good request; ``/-/healthz`` answers.
4. ``--kill-replica``: a long request that names its seed (``--long-steps``
   at the smallest size) starts; the replica working on it (the one using CPU)
   is killed (SIGKILL) while another ``--kill-requests`` requests run, every
   other one without a seed: every answer must be JSON in the API's shape (no
   plain-text 500), a request lost with the replica a 503 ``replica_lost`` with
   ``Retry-After`` or sent once more (a seeded one: the long request must be
   answered), and Serve must replace the replica without restarting the
   application (how long that takes).
5. Metrics: the service's Prometheus metrics, scraped over loopback once the
   ingress has counted the requests answered.
6. ``--overflow``: the application redeployed with small limits
   (``--overflow-max-ongoing`` per replica, ``--overflow-max-queued``,
   ``--overflow-timeout``) and ``--overflow-requests`` sent by more clients
   than fit (``--overflow-clients``, default 4 x (replicas x max ongoing + max
   queued)): the counts of 200, 429, 503 and 504, each non-200 in the API's
   error shape with ``Retry-After`` where docs/serving.md promises it.
7. What listens where: every TCP port of the namespace (``ss -ltnp``), and the
   local Ray's ports beyond loopback as ``catome-export serve`` reports them.
   ``--node-address`` gives the namespace's loopback a network address and the
   default route, as a machine on a network has.

Writes a JSON report (``--json``) with the machine, its load average before
and after, every figure, and ``checks`` (each requirement above, true or
false); exits 1 when a check fails (naming it on stderr). The replicas' pids
(``replica_pids_from_logs``) come from their Serve log files: no answer names
a process. Ray's files and token live in a short temporary folder removed at
the end; usage reports are off; requests go to 127.0.0.1 only. Ray's memory
monitor is switched off (``RAY_memory_monitor_refresh_ms=0``) because on a
machine shared with other work it counts their memory against the replicas and
kills them.

The run of issue 23's item 8 (on a machine with nothing else running; the
tiny engine first: ``catome-export build --model tiny --out engines/tiny``):

    python scripts/serve_load.py --engine engines/tiny --replicas 2 --concurrency 16 --duration 180 \\
        --bad-every 5 --check-direct --bad-requests --kill-replica --overflow \\
        --json benchmarks/results/serve_tiny_load.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True,
                   help="engine folder (required): catome-export build --model tiny writes engines/tiny")
    p.add_argument("--requests", type=int, default=None,
                   help="requests of the load (default 200, unless --duration is given)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds the load runs instead of a count of requests (default: none, --requests counts)")
    p.add_argument("--bad-every", type=int, default=0,
                   help="every N-th request of the load is a bad body, cycling through all of BAD_REQUESTS "
                        "(default 0: none)")
    p.add_argument("--concurrency", type=int, default=8, help="clients of the load (default 8)")
    p.add_argument("--replicas", type=int, default=2, help="image replicas (default 2)")
    p.add_argument("--max-batch", type=int, default=1, help="images per pipeline call (default 1)")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests an image replica takes at a time (default: the service's, twice --max-batch)")
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help="requests waiting for a free replica before 429 (default: the service's, 32)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds before a request is answered 504 (default: the service's, 300)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per request (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch/ORT threads per replica (default 1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    p.add_argument("--no-cpu-arena", action="store_true",
                   help="replicas run ONNX Runtime without its CPU memory arena (backend_options "
                        "cpu_mem_arena=False; default: the arena on)")
    p.add_argument("--check-direct", action="store_true",
                   help="compare one served image with a direct call (default: off)")
    p.add_argument("--bad-requests", action="store_true",
                   help="send each bad body once after the load (default: off)")
    p.add_argument("--kill-replica", action="store_true",
                   help="kill the replica generating a seeded request's image during a second load (default: off)")
    p.add_argument("--kill-requests", type=int, default=24,
                   help="requests of the load during which a replica is killed (default 24)")
    p.add_argument("--long-steps", type=int, default=120,
                   help="steps of the long request whose replica --kill-replica kills (default 120)")
    p.add_argument("--overflow", action="store_true",
                   help="last: redeploy with small limits and send more requests at once than fit (default: off)")
    p.add_argument("--overflow-max-ongoing", type=int, default=1,
                   help="max_ongoing_requests per replica of the overflow run (default 1)")
    p.add_argument("--overflow-max-queued", type=int, default=2,
                   help="max_queued_requests of the overflow run (default 2)")
    p.add_argument("--overflow-timeout", type=float, default=30.0,
                   help="request_timeout_s of the overflow run (default 30)")
    p.add_argument("--overflow-requests", type=int, default=60,
                   help="requests of the overflow run (default 60)")
    p.add_argument("--overflow-clients", type=int, default=None,
                   help="clients of the overflow run (default 4 x (replicas x max ongoing + max queued))")
    p.add_argument("--node-address", action="store_true",
                   help="the namespace's loopback also carries a network address and the default route "
                        "(default: loopback only)")
    p.add_argument("--ray-temp", default=None, help="Ray's temp folder (short; default a new /tmp/rs-* removed after)")
    p.add_argument("--json", default=None, help="write the report here (default: only the summary on stdout)")
    p.add_argument("--note", default=None,
                   help="a note stored in the report, e.g. what else the machine was doing (default: none)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.requests is not None and args.duration is not None:
        p.error("give --requests or --duration, not both")
    if args.requests is None and args.duration is None:
        args.requests = 200
    if args.duration is not None and not 0 < args.duration < float("inf"):
        p.error("--duration must be a number of seconds > 0")
    for name in ("requests", "concurrency", "replicas", "max_batch", "steps", "threads", "kill_requests",
                 "long_steps", "max_ongoing_requests", "max_queued_requests", "overflow_max_ongoing",
                 "overflow_max_queued", "overflow_requests", "overflow_clients"):
        value = getattr(args, name)
        if value is not None and value < 1 and not (name == "max_queued_requests" and value == -1):
            p.error(f"--{name.replace('_', '-')} must be >= 1" + (" (or -1: no limit)" if "queued" in name else ""))
    if args.bad_every < 0 or args.bad_every == 1:
        p.error("--bad-every must be 0 (no bad requests) or >= 2 (every N-th request bad)")
    for name in ("request_timeout", "overflow_timeout"):
        value = getattr(args, name)
        if value is not None and not 0 < value < float("inf"):
            p.error(f"--{name.replace('_', '-')} must be a number of seconds > 0")
    return args


def limits_of(args: argparse.Namespace) -> dict[str, Any]:
    """The limits the load's deployment runs with: the flags given, else the service's defaults (those of
    catome_export.serve.deployment, as catome-export serve uses them)."""
    from catome_export.serve.deployment import DEFAULT_MAX_QUEUED, DEFAULT_REQUEST_TIMEOUT_S, default_max_ongoing

    ongoing = args.max_ongoing_requests or default_max_ongoing(args.max_batch)
    queued = DEFAULT_MAX_QUEUED if args.max_queued_requests is None else args.max_queued_requests
    timeout = DEFAULT_REQUEST_TIMEOUT_S if args.request_timeout is None else args.request_timeout
    return {"max_ongoing_requests": ongoing, "max_queued_requests": queued, "request_timeout_s": timeout,
            "replicas": args.replicas,
            "capacity": None if queued == -1 else args.replicas * ongoing + queued}


def machine(when: str) -> dict[str, Any]:
    load = os.getloadavg()
    out: dict[str, Any] = {f"loadavg_{when}": [round(x, 2) for x in load]}
    if when == "before":
        try:
            with open("/proc/meminfo") as f:
                kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
            out["memory_total_gib"] = round(kib / 2**20, 1)
        except (OSError, StopIteration, ValueError):
            pass
        out.update(cpus=os.cpu_count(), cpu=platform.processor() or platform.machine(), system=platform.platform(),
                   python=platform.python_version())
    return out


def decode_png(b64: str) -> Any:
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def direct_image(engine: str, threads: int, prompt: str, seed: int, steps: int, guidance: float,
                 size: tuple[int, int], arena: bool = True) -> Any:
    """The same request as a direct call in this process: Runtime.load + pipeline + generate at batch 1."""
    import torch

    from catome_export.workflows.generate import ImageRequest, generate, pipeline_for_engine
    from catome_export.runtime import Runtime
    from catome_export.runtime.embed import attach

    torch.set_num_threads(threads)
    options = {"intra_op_threads": threads, **({} if arena else {"cpu_mem_arena": False})}
    with Runtime.load(engine, backend_options=options) as runtime:
        pipe = pipeline_for_engine(runtime)
        with attach(pipe, runtime):
            return generate(pipe, ImageRequest(prompt, None, steps, guidance, seed, size[0], size[1]),
                            stats=runtime).image


def replica_states() -> dict[str, int]:
    from ray import serve

    from catome_export.serve.deployment import DEPLOYMENT_NAME
    from catome_export.serve.local import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return {}
    return {str(k).split(".")[-1]: int(v) for k, v in app.deployments[DEPLOYMENT_NAME].replica_states.items()}


def app_args(args: argparse.Namespace, limits: dict[str, Any]) -> dict[str, Any]:
    """build_app's args for the engine and these limits."""
    return {"engine_dir": args.engine, "replicas": args.replicas, "max_batch": args.max_batch, "steps": args.steps,
            "threads": args.threads, "gpus_per_replica": 0,
            "backend_options": {"cpu_mem_arena": False} if args.no_cpu_arena else None,
            **{k: limits[k] for k in ("max_ongoing_requests", "max_queued_requests", "request_timeout_s")}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from catome_export.serve import loadtest
    from catome_export.serve.deployment import build_app
    from catome_export.serve.local import exposed_ports, metrics_url, ray_session, start_app, stop_app

    report: dict[str, Any] = {"note": args.note, "machine": machine("before"), "settings": {
        k: getattr(args, k) for k in ("engine", "requests", "duration", "bad_every", "concurrency", "replicas",
                                      "max_batch", "steps", "threads", "kill_requests", "no_cpu_arena")}}
    import ray

    report["settings"]["ray_version"] = ray.__version__
    limits = limits_of(args)
    report["settings"]["limits"] = limits
    port = args.port
    t0 = time.perf_counter()
    with ray_session(temp_dir=args.ray_temp, num_cpus=args.replicas + 2):
        report["ray_start_s"] = round(time.perf_counter() - t0, 2)
        try:
            t1 = time.perf_counter()
            start_app(build_app(app_args(args, limits)), host=loadtest.HOST, port=port, local=True)
            report["deploy_s"] = round(time.perf_counter() - t1, 2)
            report["listening"] = loadtest.listening_addresses()
            report["exposed"] = [list(x) for x in exposed_ports((port,))]
            info = loadtest.get(port, "/v1/engine").body
            report["engine"] = {k: info.get(k) for k in ("engine", "engine_sha256", "backend", "device", "sizes",
                                                          "default_size", "unet_batch", "max_batch", "max_steps",
                                                          "scheduler")}
            width, height = (int(x) for x in info["default_size"].split("x"))
            payload = {"prompt": "a red fox in the snow", "size": info["default_size"]}
            report["engine_fields"] = sorted(info)
            warm = loadtest.run_load(port, lambda i: {**payload, "seed": i}, args.replicas,
                                     requests=4 * args.replicas)
            report["warmup"] = warm.summary()
            pids = replica_pids(args.ray_temp, args.replicas)
            report["replica_pids_from_logs"] = pids
            url = metrics_url()
            # the ingress's counts so far: the GET of /v1/engine and the warm-up
            before = settled_metrics(url, add({"ok": 1}, warm.outcomes(), {"images": images_of(warm)}))
            with loadtest.MemorySampler(lambda: sorted(pids)) as sampler:
                load = loadtest.run_load(port, lambda i: {**payload, "seed": 1000 + i}, args.concurrency,
                                         requests=args.requests, duration_s=args.duration, bad_every=args.bad_every)
            report["load"] = {**load.summary(), "limits": limits,
                              "replica_states_after": replica_states(),
                              "healthz_after": loadtest.get(port, "/-/healthz").status,
                              "metrics": load_metrics(url, before, load)}
            report["memory"] = memory_summary(sampler.samples)
            if args.check_direct:
                report["direct"] = check_direct(args, port, payload["prompt"], (height, width))
            if args.bad_requests:
                report["bad_requests"] = check_bad_requests(port, payload)
            if args.kill_replica:
                report["kill"] = check_kill(args, port, payload, pids)
            report["replica_states_at_end"] = replica_states()
            ok = report["warmup"]["ok"] + report["load"]["ok"]
            invalid = len(loadtest.BAD_REQUESTS) if args.bad_requests else 0
            report["metrics"] = check_metrics(ok, invalid + report["load"]["outcomes"].get("invalid", 0))
            if args.overflow:  # last: it redeploys the application with other limits
                report["overflow"] = check_overflow(args, port, payload)
        finally:
            stop_app(local=True)
    report["machine"].update(machine("after"))
    report["total_s"] = round(time.perf_counter() - t0, 2)
    report["checks"] = checks(report, args)
    return report


def add(*counts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for count in counts:
        for key, value in count.items():
            out[key] = out.get(key, 0) + value
    return out


def images_of(load: Any) -> int:
    """Images the good requests of a load received (one per request: the load's payloads leave n at 1)."""
    return sum(1 for a in load.answers if a.good and a.answered)


def observed(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """What the metrics counted between two scrapes: requests by outcome (the ingress) and images (the replicas)."""
    from catome_export.serve import loadtest

    images = int(round(after.get("ray_catome_images_total", 0.0) - before.get("ray_catome_images_total", 0.0)))
    return add(loadtest.outcome_deltas(before, after), {"images": images} if images else {})


def settled_metrics(url: str | None, expected: dict[str, int], base: dict[str, float] | None = None,
                    timeout_s: float = 60.0) -> dict[str, Any]:
    """Scrapes the metrics until they have counted at least ``expected`` since ``base`` (Ray exports records
    within about ten seconds), or ``timeout_s`` has passed: the last scrape's sums, what they counted since
    ``base``, and how long it took."""
    from catome_export.serve import loadtest

    if url is None:
        return {"url": None, "sums": {}, "observed": {}, "seconds": 0.0, "reached": False}
    start = time.monotonic()
    wanted = {k: v for k, v in expected.items() if k not in ("no_answer", "not_json")}  # answers no ingress gives
    sums: dict[str, float] = {}
    while True:
        try:
            sums = loadtest.metric_sums(loadtest.scrape(url))
        except OSError as exc:  # the metrics agent not answering yet: keep the last scrape
            logging.getLogger(__name__).warning("scraping %s: %s", url, exc)
        seen = observed(base or {}, sums)
        reached = all(seen.get(k, 0) >= v for k, v in wanted.items())
        if reached or time.monotonic() - start > timeout_s:
            return {"url": url, "sums": sums, "observed": seen, "seconds": round(time.monotonic() - start, 1),
                    "reached": reached}
        time.sleep(2)


def load_metrics(url: str | None, before: dict[str, Any], load: Any) -> dict[str, Any]:
    """The ingress's request counts by outcome and the replicas' images over the load, against the clients'."""
    from catome_export.serve import loadtest

    if url is None or not before["reached"]:
        return {"url": url, "consistent": None, "why": "no metrics export" if url is None else
                f"the counts before the load never reached the clients' ({before['observed']})"}
    client = add(load.outcomes(), {"images": images_of(load)})
    after = settled_metrics(url, client, before["sums"])
    return {"url": url, "seconds": after["seconds"], **loadtest.compare_counts(client, after["observed"])}


def replica_pids(ray_temp: str, replicas: int, timeout_s: float = 120.0) -> list[int]:
    """The replicas' pids, from their Serve log files (responses name no process), once all have loaded."""
    from catome_export.serve import loadtest

    deadline = time.monotonic() + timeout_s
    pids = loadtest.live_replica_pids(ray_temp)
    while len(pids) < replicas and time.monotonic() < deadline:
        time.sleep(0.5)
        pids = loadtest.live_replica_pids(ray_temp)
    return pids


def answering_pids(ray_temp: str, request_ids: list[str], wait_s: float = 10.0) -> set[int]:
    """Pids of the replicas that answered these requests (Serve logs a request's id just after answering it)."""
    from catome_export.serve import loadtest

    deadline = time.monotonic() + wait_s
    found = loadtest.answered_by(ray_temp, request_ids)
    while len(found) < len(request_ids) and time.monotonic() < deadline:
        time.sleep(0.2)
        found = loadtest.answered_by(ray_temp, request_ids)
    return set(found.values())


def check_direct(args: argparse.Namespace, port: int, prompt: str, size: tuple[int, int]) -> dict[str, Any]:
    import numpy as np

    from catome_export.defaults import DEFAULT_GUIDANCE
    from catome_export.serve import loadtest

    seed = 4242
    reply = loadtest.post(port, "/v1/images/generations", {"prompt": prompt, "seed": seed,
                                                           "size": f"{size[1]}x{size[0]}"})
    if reply.status != 200:
        return {"status": reply.status, "identical": False, "error": reply.body}
    served = decode_png(reply.body["data"][0]["b64_json"])
    direct = direct_image(args.engine, args.threads, prompt, seed, args.steps, DEFAULT_GUIDANCE, size,
                          arena=not args.no_cpu_arena)
    diff = np.abs(served.astype(np.int16) - direct.astype(np.int16))
    return {"status": reply.status, "seed": seed, "shape": list(served.shape),
            "identical": bool(served.shape == direct.shape and not diff.any()), "max_abs_diff": int(diff.max()),
            "batch_images": reply.body["catome"]["images"][0]["batch_images"], "max_batch": args.max_batch,
            "catome_fields": sorted(reply.body["catome"])}


def check_bad_requests(port: int, payload: dict[str, Any]) -> dict[str, Any]:
    from catome_export.serve import loadtest

    cases = []
    for name, body in loadtest.BAD_REQUESTS:
        reply = loadtest.post(port, "/v1/images/generations", body)
        error = reply.body.get("error") or {}
        cases.append({"case": name, "status": reply.status, "type": error.get("type"),
                      "message": error.get("message"), "problem": loadtest.shape_problem(reply)})
    after = loadtest.post(port, "/v1/images/generations", {**payload, "seed": 7})
    health = loadtest.get(port, "/-/healthz")
    return {"cases": cases, "good_request_after": after.status, "healthz": health.status}


def memory_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    per_pid: dict[str, list[tuple[float, int]]] = {}
    for sample in samples:
        for pid, rss in sample["rss_bytes"].items():
            per_pid.setdefault(pid, []).append((sample["t_s"], rss))
    out: dict[str, Any] = {"samples": len(samples), "replicas": {}}
    for pid, series in per_pid.items():
        first, last = series[0][1], series[-1][1]
        warm = series[len(series) // 5][1]  # after the first fifth of the load: sessions and arenas have grown
        out["replicas"][pid] = {"first_mib": round(first / 2**20, 1), "warm_mib": round(warm / 2**20, 1),
                                "last_mib": round(last / 2**20, 1),
                                "max_mib": round(max(r for _, r in series) / 2**20, 1),
                                "growth_pct": round(100.0 * (last - warm) / warm, 2),
                                "series_mib": [[t, round(r / 2**20, 1)] for t, r in series[:: max(1, len(series) // 40)]]}
    return out


def check_metrics(ok: int, invalid: int, timeout_s: float = 60.0) -> dict[str, Any]:
    """The service's Prometheus metrics, scraped (over loopback) once the ingress has counted at least ``ok``
    answered requests and ``invalid`` bad ones (Ray exports records within about ten seconds)."""
    from catome_export.serve import loadtest
    from catome_export.serve.local import metrics_url

    url = metrics_url()
    if url is None:
        return {"url": None}
    start = time.monotonic()
    sums: dict[str, float] = {}
    while time.monotonic() - start < timeout_s:
        sums = loadtest.metric_sums(loadtest.scrape(url))
        if sums.get("ray_catome_requests_total{outcome=ok}", 0) >= ok and \
                sums.get("ray_catome_requests_total{outcome=invalid}", 0) >= invalid and \
                sums.get("ray_catome_images_total", 0) > 0:
            break
        time.sleep(2)
    return {"url": url, "seconds": round(time.monotonic() - start, 1), "expected_ok": ok,
            "expected_invalid": invalid, "sums": sums}


def check_kill(args: argparse.Namespace, port: int, payload: dict[str, Any], pids: list[int]) -> dict[str, Any]:
    import threading

    from catome_export.serve import loadtest

    info = loadtest.get(port, "/v1/engine").body
    smallest = info["sizes"].split("..")[0]
    long_payload = {**payload, "size": smallest, "seed": 4321, "steps": args.long_steps}
    long_reply: list[Any] = []
    sent = time.perf_counter()
    long_thread = threading.Thread(target=lambda: long_reply.append(
        loadtest.post(port, "/v1/images/generations", long_payload)))
    long_thread.start()
    victim, busy_s = None, 0.0
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and long_thread.is_alive():
        used = loadtest.cpu_use(pids)
        ranked = sorted(used, key=lambda pid: used[pid], reverse=True)
        if ranked and used[ranked[0]] >= 0.05 and all(used[ranked[0]] >= 3 * used[p] for p in ranked[1:]):
            victim, busy_s = ranked[0], used[ranked[0]]  # the replica generating the long request's image
    victim = victim or pids[0]
    killed_at: list[float] = []

    def during(i: int) -> None:
        if i == args.kill_requests // 3 and not killed_at:
            os.kill(victim, signal.SIGKILL)
            killed_at.append(time.perf_counter())

    # every other request names no seed: lost with its replica, it is answered 503 replica_lost (a seeded one is
    # sent once more)
    load = loadtest.run_load(port, lambda i: {**payload, "seed": 5000 + i} if i % 2 == 0 else dict(payload),
                             args.concurrency, requests=args.kill_requests, during=during)
    long_thread.join(timeout=600)
    long = long_reply[0] if long_reply else None
    recovered_s = None
    request_ids = list(load.request_ids)
    answered_by = answering_pids(args.ray_temp, request_ids)
    polls: list[Any] = []  # the requests sent until a replacement answers: in the API's shape too
    deadline = time.perf_counter() + 240
    while time.perf_counter() < deadline:
        states = replica_states()
        reply = loadtest.post(port, "/v1/images/generations", {**payload, "seed": 9})
        polls.append(loadtest.answer_of(-2 - len(polls), reply))
        if reply.status == 200 and reply.request_id:
            request_ids.append(reply.request_id)
            answered_by = answering_pids(args.ray_temp, request_ids, wait_s=2.0)
        if states.get("RUNNING", 0) >= args.replicas and reply.status == 200 and len(answered_by - {victim}) >= 1:
            new = answered_by - set(pids)
            if new or args.replicas == 1:
                recovered_s = time.perf_counter() - killed_at[0]
                break
        time.sleep(0.5)
    survivors = [p for p in pids if p != victim]
    long_summary: dict[str, Any] = {"status": None}
    answers = list(load.answers) + polls
    if long is not None:
        error = long.body.get("error") if isinstance(long.body, dict) else None
        long_summary = {"status": long.status, "images": len(long.body.get("data", [])), "json": "raw" not in long.body,
                        "error_code": (error or {}).get("code"), "seconds": round(long.seconds, 2),
                        "killed_after_s": round(killed_at[0] - sent, 2) if killed_at else None,
                        "victim_was_busy_s": round(busy_s, 2), "retry_after": long.headers.get("retry-after"),
                        "problem": loadtest.shape_problem(long)}
        answers.append(loadtest.answer_of(-1, long))
    return {"victim_pid": victim, "killed_after_request": args.kill_requests // 3, "load": load.summary(),
            "long_request": long_summary, **loadtest.replica_loss_summary(answers),
            "recovered_s": None if recovered_s is None else round(recovered_s, 2),
            "replaced": recovered_s is not None, "new_replica_pids": sorted(answered_by - set(pids)),
            "survivor_pids_still_answering": sorted(set(survivors) & answered_by), "replica_states": replica_states()}


def check_overflow(args: argparse.Namespace, port: int, payload: dict[str, Any]) -> dict[str, Any]:
    """The application redeployed with small limits, and more clients than fit: what each request got."""
    from catome_export.serve import loadtest
    from catome_export.serve.deployment import build_app
    from catome_export.serve.local import start_app

    limits = {"max_ongoing_requests": args.overflow_max_ongoing, "max_queued_requests": args.overflow_max_queued,
              "request_timeout_s": args.overflow_timeout, "replicas": args.replicas}
    limits["capacity"] = args.replicas * args.overflow_max_ongoing + args.overflow_max_queued
    clients = args.overflow_clients or 4 * limits["capacity"]
    t0 = time.perf_counter()
    start_app(build_app(app_args(args, limits)), host=loadtest.HOST, port=port, local=True)
    redeploy_s = time.perf_counter() - t0
    load = loadtest.run_load(port, lambda i: {**payload, "seed": 7000 + i}, clients, requests=args.overflow_requests)
    summary = load.summary()
    counts = {str(status): summary["statuses"].get(str(status), 0) for status in (200, 429, 503, 504)}
    counts["other"] = summary["requests"] - sum(counts.values())
    refused = [a.seconds for a in load.answers if a.status == 429]
    return {"limits": limits, "clients": clients, "requests": summary["requests"],
            "redeploy_s": round(redeploy_s, 2), "counts": counts,
            "by_code": loadtest.count_by(f"{a.status} {a.code}" for a in load.answers if a.status != 200),
            "retry_after": loadtest.count_by(a.retry_after for a in load.answers if a.status != 200),
            "not_api_shape": summary["not_api_shape"], "first_not_api_shape": summary["first_not_api_shape"],
            "max_429_s": round(max(refused), 4) if refused else None,
            "ok_latency": {k: summary[k] for k in ("p50_s", "p99_s", "max_s")},
            "replica_states_after": replica_states()}


def checks(report: dict[str, Any], args: argparse.Namespace) -> dict[str, bool]:
    """Each requirement of the run, true where it held (only those of the parts that ran)."""
    out: dict[str, bool] = {}
    load = report.get("load")
    if load is not None:
        out["load: no good request failed"] = load["errors"] == 0 and load["good"]["answered"] > 0
        out["load: every answer in the API's shape"] = load["not_api_shape"] == 0
        if "bad" in load:
            out["load: every bad request answered 4xx"] = load["bad"]["all_4xx"] and load["bad"]["sent"] > 0
        out["load: the replicas running after it"] = load["replica_states_after"] == {"RUNNING": args.replicas} \
            and load["healthz_after"] == 200
        out["load: metrics match the clients' counts"] = load["metrics"].get("consistent") is True
    if "bad_requests" in report:
        bad = report["bad_requests"]
        out["bad requests: each answered 400 in the API's shape, then a good one 200"] = all(
            c["status"] == 400 and c["problem"] is None for c in bad["cases"]) and bad["good_request_after"] == 200
    if "direct" in report:
        out["direct: identical to a direct call"] = bool(report["direct"].get("identical"))
    if "kill" in report:
        kill = report["kill"]
        out["kill: every answer JSON in the API's shape (no plain-text 500)"] = not kill["not_api_shape"]
        out["kill: every non-200 a 503 replica_lost with Retry-After"] = not kill["other_non_200"]
        out["kill: the seeded request on the killed replica answered"] = kill["long_request"]["status"] == 200
        out["kill: the replica replaced"] = bool(kill["replaced"])
    if "overflow" in report:
        over = report["overflow"]
        out["overflow: every answer in the API's shape, Retry-After where promised"] = over["not_api_shape"] == 0
        out["overflow: some requests answered, some shed 429"] = over["counts"]["200"] > 0 and \
            over["counts"]["429"] > 0
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from catome_export.serve import loadtest

    if not loadtest.in_isolated_network():
        command = loadtest.isolated_command([sys.executable, str(Path(__file__).resolve()), *argv],
                                            node_address=args.node_address)
        try:
            return subprocess.call(command, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
        except OSError as exc:
            print(f"error: cannot run in an isolated network namespace ({exc}): this script needs "
                  "unshare -n (root)", file=sys.stderr)
            return 1
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # a busy machine starts the raylet slowly
    if args.ray_temp is None:
        args.ray_temp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
        made = True
    else:
        made = False
    args.engine = str(Path(args.engine).resolve())
    try:
        report = run(args)
    finally:
        if made:
            import shutil

            shutil.rmtree(args.ray_temp, ignore_errors=True)
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    summary: dict[str, Any] = {k: report[k] for k in ("ray_start_s", "deploy_s") if k in report}
    summary["load"] = {k: report["load"][k] for k in ("ok", "errors", "shed", "p50_s", "p99_s", "max_s",
                                                      "throughput_rps")}
    if "overflow" in report:
        summary["overflow"] = report["overflow"]["counts"]
    print(json.dumps(summary))
    failed = [name for name, held in report["checks"].items() if not held]
    for name in failed:
        print(f"check failed: {name}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
