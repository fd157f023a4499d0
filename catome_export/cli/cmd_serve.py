"""``catome-export serve``: an engine behind OpenAI's images API on Ray Serve (a thin layer over catome_export.serve)."""

from __future__ import annotations

import argparse
import logging
import sys

from catome_export.cli.vocab import deprecate, engine_folder
from catome_export.errors import CatomeError
from catome_export.defaults import DEFAULT_STEPS

logger = logging.getLogger(__name__)

# the limits' defaults, as catome_export.serve.deployment has them (that module needs Ray; this one must not)
DEFAULT_MAX_QUEUED = 32
DEFAULT_REQUEST_TIMEOUT_S = 300.0
DEFAULT_DRAIN_TIMEOUT_S = 20.0

DESCRIPTION = """\
Serve an engine folder over HTTP (POST /v1/images/generations, OpenAI's
images API; PNG as base64) on Ray Serve: one replica holds one runtime and
its pipeline (one GPU each where there are GPUs), batches requests up to
--max-batch, is health-checked and restarted by Serve. Without --address a
local Ray is started and stopped with the command; with --address the
application joins that cluster (and is deleted from it on Ctrl-C). The
engine is pinned at deploy (the sha256 of its manifest.json): a replica
whose folder holds another engine refuses to serve. To roll out a new
engine, build it into a new folder and deploy that folder.

Every error is JSON in OpenAI's shape: a full queue is answered 429 and a
stopping service or a lost replica 503 (both with Retry-After), a request
older than --request-timeout 504. Ctrl-C or SIGTERM drains: new requests get
503, those in flight get --drain-timeout seconds to finish, then Ray stops.
A local Ray listens on 127.0.0.1 (the HTTP proxy on --host); the command
names the few ports Ray Serve binds to every interface when it starts.

examples:
  catome-export serve --engine engines/tiny
  catome-export serve --engine engines/sd15 --replicas 4 --max-batch 2
  catome-export serve --engine /shared/engines/sd15 --address ray://head:10001 --min-replicas 1 --max-replicas 8
  curl -s 127.0.0.1:8000/v1/images/generations -d '{"prompt": "a red fox", "size": "256x256"}'
"""


def _positive(name: str, value: int | None, lo: int = 1) -> None:
    if value is not None and value < lo:
        raise CatomeError(f"{name} must be >= {lo}, got {value}")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from catome_export.cli.cmd_generate import r_multiple_arg
    from catome_export.serve.local import check_port_free, require_ray
    from catome_export.serve.service import (ServeOptions, check_feature_cache_option, check_max_batch,
                                             engine_batch_range, pin_engine)

    if not 1 <= args.port <= 65535:
        raise CatomeError(f"--port must be in 1..65535, got {args.port}")
    if args.metrics_port is not None and not 1 <= args.metrics_port <= 65535:
        raise CatomeError(f"--metrics-port must be in 1..65535, got {args.metrics_port}")
    if args.replicas is not None and (args.min_replicas is not None or args.max_replicas is not None):
        raise CatomeError("give --replicas N (a fixed count) or --min-replicas/--max-replicas (autoscaling), not both")
    _positive("--replicas", args.replicas)
    _positive("--min-replicas", args.min_replicas, 0)
    _positive("--max-replicas", args.max_replicas)
    if args.min_replicas is not None and args.max_replicas is not None and args.max_replicas < args.min_replicas:
        raise CatomeError(f"--max-replicas {args.max_replicas} is below --min-replicas {args.min_replicas}")
    _positive("--max-ongoing-requests", args.max_ongoing_requests)
    if not (args.max_queued_requests >= 1 or args.max_queued_requests == -1):
        raise CatomeError(f"--max-queued-requests must be >= 1, or -1 for no limit, got {args.max_queued_requests}")
    if not 0 < args.request_timeout < float("inf"):
        raise CatomeError(f"--request-timeout must be a number of seconds > 0, got {args.request_timeout:g}")
    if not 0 <= args.drain_timeout < float("inf"):
        raise CatomeError(f"--drain-timeout must be a number of seconds >= 0, got {args.drain_timeout:g}")
    engine_dir = Path(engine_folder(args, "serve")).expanduser().resolve()
    options = ServeOptions(engine_dir=str(engine_dir), backend=args.backend,
                           device=None if args.device == "auto" else args.device,
                           max_batch=args.max_batch, steps=args.steps, max_images=args.max_images,
                           threads=args.threads, engine_sha256=args.engine_sha256,
                           feature_cache=args.feature_cache, r_multiple=r_multiple_arg(args))
    local = args.address is None
    if local or engine_dir.exists():  # a joined cluster may hold the folder on its GPU machines only
        check_max_batch(options.max_batch, engine_batch_range(engine_dir))
        check_feature_cache_option(engine_dir, options.feature_cache)
    options = pin_engine(options)  # the replicas refuse any other engine
    require_ray()
    if local:
        check_port_free(args.host, args.port)
    return _serve(args, options, local)


def _serve(args: argparse.Namespace, options: object, local: bool) -> int:
    from catome_export.serve.deployment import build_app
    from catome_export.serve.local import StopSignals, ray_session, start_app, stop_app, wait_forever

    app_args = dict(options.to_dict())  # type: ignore[attr-defined]
    for key in ("replicas", "min_replicas", "max_replicas", "max_ongoing_requests", "max_queued_requests"):
        if getattr(args, key) is not None:
            app_args[key] = getattr(args, key)
    app_args["request_timeout_s"] = args.request_timeout
    started = False
    with StopSignals() as signals:
        try:
            # A local Ray counts at least one CPU per replica (each asks for one), so that --replicas above the
            # core count starts them all instead of leaving some waiting for CPUs that never come.
            import os

            wanted = (args.max_replicas or args.replicas or 1) + 1
            num_cpus = max(os.cpu_count() or 1, wanted) if local else None
            with ray_session(args.address, num_cpus=num_cpus, log_to_driver=args.verbose,
                             metrics_port=args.metrics_port if local else None):
                signals.arm()  # over the SIGTERM handler ray.init installs
                try:
                    app = build_app(app_args)
                    print(f"starting {'a local Ray' if local else 'on ' + args.address} and Serve ...", flush=True)
                    start_app(app, host=args.host, port=args.port, local=local)
                    started = True
                    if local:
                        _report_exposure(args.port)
                        _report_metrics()
                    shown = f"[{args.host}]" if ":" in args.host else args.host
                    print(f"serving {options.engine_dir} at http://{shown}:{args.port}/v1/images/generations "  # type: ignore[attr-defined]
                          "(Ctrl-C stops)", flush=True)
                    try:
                        wait_forever()
                    except KeyboardInterrupt:
                        _drain(args.drain_timeout)
                        raise
                finally:
                    signals.ignore()  # the stop itself runs to its end
                    if started or local:
                        stop_app(local)
        except KeyboardInterrupt:
            print("stopped: Serve and Ray were shut down" if local else "stopped: the application was deleted "
                  "from the cluster", file=sys.stderr)
            return 130
    return 0


def _report_exposure(port: int) -> None:
    """One line naming every port of the local Ray that listens beyond loopback (docs/serving.md, "What listens
    where"): Ray Serve binds each replica's gRPC server, for calls between deployments, to every interface."""
    from catome_export.serve.local import exposed_ports

    exposed = exposed_ports((port,))
    if not exposed:
        return
    listed = ", ".join(f"{address} ({name})" for address, name in exposed)
    why = "Ray binds them so"
    if all(name.startswith("ray::ServeReplica") for _, name in exposed):
        why = ("each Serve replica's gRPC server for calls between deployments; they take only calls carrying "
               "this Ray session's authentication token")
    print(f"note: {len(exposed)} port(s) of the local Ray listen beyond 127.0.0.1, as Ray offers no option to bind "
          f"them to loopback ({why}): {listed}", file=sys.stderr, flush=True)


def _report_metrics() -> None:
    from catome_export.serve.local import metrics_url

    url = metrics_url()
    if url is not None:
        print(f"metrics: {url} (Prometheus; docs/serving.md, \"Metrics\")", flush=True)


def _drain(timeout_s: float) -> None:
    """Ctrl-C or SIGTERM: no new requests; those in flight get ``timeout_s`` to finish, then an answer 503."""
    from catome_export.serve.local import drain_app

    def announce(in_flight: int) -> None:
        print(f"stopping: new requests are answered 503; waiting up to {timeout_s:g} s for {in_flight} request(s) "
              "in flight (Ctrl-C again: answer them 503 now)", file=sys.stderr, flush=True)

    try:
        started, aborted = drain_app(timeout_s, announce)
    except Exception as exc:  # the stop goes on whatever the drain met
        print(f"draining failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); stopping now",
              file=sys.stderr, flush=True)
        return
    if started and not aborted:
        print("drained: every request in flight was answered", file=sys.stderr, flush=True)
    elif aborted:
        print(f"drain timeout: {aborted} request(s) still in flight were answered 503", file=sys.stderr, flush=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an engine over HTTP (OpenAI images API) on Ray Serve",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default=None, metavar="DIR", help="an engine folder written by catome-export build (required)")
    deprecate(p, "ENGINE_DIR", "--engine", use="--engine DIR")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, default=None, metavar="N", help="a fixed number of replicas (default 1)")
    p.add_argument("--min-replicas", type=int, default=None, metavar="N", help="autoscaling: fewest replicas (default: no autoscaling)")
    p.add_argument("--max-replicas", type=int, default=None, metavar="M", help="autoscaling: most replicas (default: no autoscaling)")
    p.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="most images per engine call (dynamic batching; default 1: images identical to a direct "
                        "call; larger batches share one merge count r per step, which changes pixels slightly)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, metavar="N",
                   help=f"denoising steps of a request that names none (default {DEFAULT_STEPS})")
    p.add_argument("--max-images", type=int, default=8, metavar="N", help="most images (n) per request (default 8)")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local Ray (default: a local cluster on this machine)")
    p.add_argument("--backend", default="auto", help="engine backend in each replica (default auto)")
    p.add_argument("--device", default="auto",
                   help="device in each replica: auto (cuda where it has a GPU), cpu or cuda[:N] (default auto)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads per replica (torch and ORT) (default: the libraries' own)")
    p.add_argument("--feature-cache", "--deepcache", default=None, metavar="I,b",
                   help="DeepCache-style feature caching of every generation: I,b (interval, branch), 'full:0,5;b' "
                        "or off (default: the engine's own, set at build; the branch must be one it was cut for)")
    from catome_export.cli.cmd_generate import add_r_multiple_option

    add_r_multiple_option(p, engine_default=True)
    p.add_argument("--max-ongoing-requests", type=int, default=None, metavar="N",
                   help="requests one replica works on or batches at a time (default: twice --max-batch, so the "
                        "next batch gathers while one runs)")
    p.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED, metavar="N",
                   help="requests waiting for a free replica; one more is answered 429 with Retry-After (default "
                        f"{DEFAULT_MAX_QUEUED}; -1: no limit)")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, metavar="S",
                   help="seconds from a request's arrival to its answer; an older request is answered 504 and its "
                        f"queued work dropped (default {DEFAULT_REQUEST_TIMEOUT_S:g})")
    p.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S, metavar="S",
                   help="on Ctrl-C or SIGTERM: seconds the requests in flight have to finish before they are "
                        f"answered 503 and Ray stops; new requests are answered 503 meanwhile (default "
                        f"{DEFAULT_DRAIN_TIMEOUT_S:g})")
    p.add_argument("--metrics-port", type=int, default=None, metavar="N",
                   help="port of a local Ray's Prometheus metrics, on 127.0.0.1 (default: a free port, printed at "
                        "start)")
    p.add_argument("--engine-sha256", default=None, metavar="HASH",
                   help="sha256 of the --engine folder's manifest.json the replicas must find (default: computed here; needed "
                        "with --address when the folder is on the cluster's machines only)")
    p.set_defaults(func=run)
