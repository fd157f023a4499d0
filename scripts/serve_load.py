"""Load and reliability test of ``catome-export serve`` on this machine, isolated from the network.

Starts a local Ray and Serve (in a network namespace with only loopback and
its own PID namespace: the script re-runs itself under ``unshare`` unless it
already is in one; needs root), deploys the engine, and then:

1. ``--check-direct``: one request at batch 1 against a direct call
   (Runtime + pipeline + ``generate``) in this process: identical pixels?
2. ``--bad-requests``: malformed and out-of-range requests get HTTP 400 with
   OpenAI's error shape, and the replica answers the next good request;
   ``/-/healthz`` answers.
3. Load: ``--requests`` requests, ``--concurrency`` at a time: p50/p99
   latency, errors, resident memory of every replica sampled over time
   (growth measured from the end of the first fifth of the load to its end).
4. ``--kill-replica``: a long request that names its seed (``--long-steps``
   at the smallest size) starts; the replica working on it (the one using CPU)
   is killed (SIGKILL) while another ``--kill-requests`` requests run: the long
   request must still be answered (sent once more to another replica), every
   answer must be JSON, and Serve must replace the replica without restarting
   the application (how long that takes).
5. Metrics: the service's Prometheus metrics, scraped over loopback once the
   ingress has counted the requests answered.
6. What listens where: every TCP port of the namespace (``ss -ltnp``), and the
   local Ray's ports beyond loopback as ``catome-export serve`` reports them.
   ``--node-address`` gives the namespace's loopback a network address and the
   default route, as a machine on a network has.

Writes a JSON report (``--json``) with the machine, its load average before
and after, and every figure. Ray's files and token live in a short temporary
folder removed at the end; usage reports are off; requests go to 127.0.0.1
only. Ray's memory monitor is switched off (``RAY_memory_monitor_refresh_ms=0``)
because on a machine shared with other work it counts their memory against
the replicas and kills them.

    python scripts/serve_load.py --engine engines/tiny --requests 200 --concurrency 8 \\
        --check-direct --bad-requests --kill-replica --json benchmarks/results/serve_tiny_cpu.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
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

BAD_REQUESTS: list[tuple[str, bytes]] = [
    ("malformed JSON", b'{"prompt": '),
    ("missing prompt", b'{"n": 1}'),
    ("n = 0", b'{"prompt": "a red fox", "n": 0}'),
    ("n above the limit", b'{"prompt": "a red fox", "n": 1000}'),
    ("size not a multiple of 8", b'{"prompt": "a red fox", "size": "100x100"}'),
    ("size outside the built range", b'{"prompt": "a red fox", "size": "4096x4096"}'),
    ("steps = 0", b'{"prompt": "a red fox", "steps": 0}'),
    ("wrong type", b'{"prompt": "a red fox", "guidance_scale": "high"}'),
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, help="engine folder (catome-export build --model tiny writes engines/tiny)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="denoising steps per request (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch/ORT threads per replica (default 1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-cpu-arena", action="store_true",
                   help="replicas run ONNX Runtime without its CPU memory arena (backend_options cpu_mem_arena=False)")
    p.add_argument("--check-direct", action="store_true")
    p.add_argument("--bad-requests", action="store_true")
    p.add_argument("--kill-replica", action="store_true")
    p.add_argument("--kill-requests", type=int, default=24)
    p.add_argument("--long-steps", type=int, default=120,
                   help="steps of the long request whose replica --kill-replica kills (default 120)")
    p.add_argument("--node-address", action="store_true",
                   help="the namespace's loopback also carries a network address and the default route")
    p.add_argument("--ray-temp", default=None, help="Ray's temp folder (short; default a new /tmp/rs-* removed after)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--note", default=None, help="a note stored in the report (e.g. what else the machine was doing)")
    args = p.parse_args(argv)
    for name in ("requests", "concurrency", "replicas", "max_batch", "steps", "threads", "kill_requests",
                 "long_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from catome_export.serve import loadtest
    from catome_export.serve.deployment import build_app
    from catome_export.serve.local import exposed_ports, ray_session, start_app, stop_app

    report: dict[str, Any] = {"note": args.note, "machine": machine("before"), "settings": {
        k: getattr(args, k) for k in ("engine", "requests", "concurrency", "replicas", "max_batch", "steps",
                                      "threads", "kill_requests", "no_cpu_arena")}}
    import ray

    report["settings"]["ray_version"] = ray.__version__
    port = args.port
    t0 = time.perf_counter()
    with ray_session(temp_dir=args.ray_temp, num_cpus=args.replicas + 2):
        report["ray_start_s"] = round(time.perf_counter() - t0, 2)
        try:
            t1 = time.perf_counter()
            app = build_app({"engine_dir": args.engine, "replicas": args.replicas, "max_batch": args.max_batch,
                             "steps": args.steps, "threads": args.threads, "gpus_per_replica": 0,
                             "backend_options": {"cpu_mem_arena": False} if args.no_cpu_arena else None})
            start_app(app, host=loadtest.HOST, port=port, local=True)
            report["deploy_s"] = round(time.perf_counter() - t1, 2)
            report["listening"] = loadtest.listening_addresses()
            report["exposed"] = [list(x) for x in exposed_ports((port,))]
            info = loadtest.get(port, "/v1/engine").body
            report["engine"] = {k: info.get(k) for k in ("engine", "engine_sha256", "backend", "device", "sizes",
                                                          "default_size", "unet_batch", "max_batch")}
            width, height = (int(x) for x in info["default_size"].split("x"))
            payload = {"prompt": "a red fox in the snow", "size": info["default_size"]}
            report["engine_fields"] = sorted(info)
            warm = loadtest.run_load(port, lambda i: {**payload, "seed": i}, 4 * args.replicas, args.replicas)
            report["warmup"] = warm.summary()
            pids = replica_pids(args.ray_temp, args.replicas)
            report["replica_pids"] = pids
            if args.check_direct:
                report["direct"] = check_direct(args, port, payload["prompt"], (height, width))
            if args.bad_requests:
                report["bad_requests"] = check_bad_requests(port, payload)
            with loadtest.MemorySampler(lambda: sorted(pids)) as sampler:
                load = loadtest.run_load(port, lambda i: {**payload, "seed": 1000 + i}, args.requests,
                                         args.concurrency)
            report["load"] = load.summary()
            report["memory"] = memory_summary(sampler.samples)
            if args.kill_replica:
                report["kill"] = check_kill(args, port, payload, pids)
            report["replica_states_at_end"] = replica_states()
            ok = report["warmup"]["ok"] + report["load"]["ok"]
            report["metrics"] = check_metrics(ok, 8 if args.bad_requests else 0)
        finally:
            stop_app(local=True)
    report["machine"].update(machine("after"))
    report["total_s"] = round(time.perf_counter() - t0, 2)
    return report


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
    for name, body in BAD_REQUESTS:
        reply = loadtest.post(port, "/v1/images/generations", body)
        error = reply.body.get("error") or {}
        cases.append({"case": name, "status": reply.status, "type": error.get("type"),
                      "message": error.get("message")})
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

    load = loadtest.run_load(port, lambda i: {**payload, "seed": 5000 + i}, args.kill_requests, args.concurrency,
                             during=during)
    long_thread.join(timeout=600)
    long = long_reply[0] if long_reply else None
    recovered_s = None
    request_ids = list(load.request_ids)
    answered_by = answering_pids(args.ray_temp, request_ids)
    deadline = time.perf_counter() + 240
    while time.perf_counter() < deadline:
        states = replica_states()
        reply = loadtest.post(port, "/v1/images/generations", {**payload, "seed": 9})
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
    if long is not None:
        error = long.body.get("error") if isinstance(long.body, dict) else None
        long_summary = {"status": long.status, "images": len(long.body.get("data", [])), "json": "raw" not in long.body,
                        "error_code": (error or {}).get("code"), "seconds": round(long.seconds, 2),
                        "killed_after_s": round(killed_at[0] - sent, 2) if killed_at else None,
                        "victim_was_busy_s": round(busy_s, 2), "retry_after": long.headers.get("retry-after")}
    return {"victim_pid": victim, "killed_after_request": args.kill_requests // 3, "load": load.summary(),
            "long_request": long_summary,
            "recovered_s": None if recovered_s is None else round(recovered_s, 2),
            "replaced": recovered_s is not None, "new_replica_pids": sorted(answered_by - set(pids)),
            "survivor_pids_still_answering": sorted(set(survivors) & answered_by), "replica_states": replica_states()}


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
    summary = {k: report[k] for k in ("ray_start_s", "deploy_s") if k in report}
    summary["load"] = {k: report["load"][k] for k in ("ok", "errors", "p50_s", "p99_s", "throughput_rps")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
