"""Run inside a loopback-only namespace by test_serve_ray.py: ``catome-export serve --engine ENGINE`` with small limits, then
requests that meet each limit, then SIGTERM while requests are in flight.

Usage: python cli_scenario.py ENGINE_DIR OUT_JSON. Writes what happened as JSON (the test asserts on it).

The service runs with one replica that takes one request at a time (``--max-ongoing-requests 1``) and one more
waiting (``--max-queued-requests 1``), ``--request-timeout 8`` and ``--drain-timeout 4``. Request durations are set
in units of ``L``, about 1.5 s of generation, measured on the running service first (steps per second). Steps
counts name the requests in the replica's log ("N steps in"), which tells whether a request's work ran at all.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PORT = 8000
REQUEST_TIMEOUT_S = 8.0
DRAIN_TIMEOUT_S = 4.0
UNIT_S = 1.5
"""``L``: the generation time the phases are built from."""
SIZE = "128x128"


class Background:
    """A POST answered on a thread of its own."""

    def __init__(self, payload: dict[str, Any]) -> None:
        from catome_export.serve.loadtest import post

        self.reply: Any = None
        self.answered_at: float | None = None

        def run() -> None:
            self.reply = post(PORT, "/v1/images/generations", payload, timeout=120)
            self.answered_at = time.monotonic()

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def wait(self) -> Any:
        self._thread.join(timeout=180)
        return self.reply


def summary(reply: Any) -> dict[str, Any]:
    """Status, the error's code and type, Retry-After, seconds; whether the body is the API's JSON."""
    if reply is None:
        return {"status": None}
    error = reply.body.get("error") if isinstance(reply.body, dict) else None
    return {"status": reply.status, "seconds": round(reply.seconds, 2), "images": len(reply.body.get("data", [])),
            "error_type": (error or {}).get("type"), "error_code": (error or {}).get("code"),
            "error_keys": sorted(error) if isinstance(error, dict) else None,
            "retry_after": reply.headers.get("retry-after") if reply.headers else None,
            "json": "raw" not in reply.body}


def ray_temp_dir() -> str | None:
    """The local Ray's temp folder of the command (from its processes' command lines; this PID namespace has
    only the command's)."""
    from catome_export.serve.loadtest import process_commands

    for command in process_commands().values():
        found = re.search(r"(/tmp/rs-[A-Za-z0-9_]+)", command)
        if found:
            return found.group(1)
    return None


def generations(ray_temp: str, steps: int) -> int:
    """Pipeline calls of ``steps`` steps the image replicas logged."""
    logs = Path(ray_temp) / "session_latest" / "logs" / "serve"
    pattern = re.compile(rf"image\(s\) \d+x\d+, {steps} steps in ")
    return sum(len(pattern.findall(p.read_text(errors="replace"))) for p in logs.glob("replica_*CatomeImages*.log"))


def open_and_leave(payload: dict[str, Any]) -> socket.socket:
    """A request sent on a raw connection whose answer is never read (the client goes away with ``close``)."""
    body = json.dumps(payload).encode()
    sock = socket.create_connection(("127.0.0.1", PORT), timeout=10)
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def wait_for_line(path: Path, prefix: str, proc: subprocess.Popen, timeout_s: float) -> str | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        lines = [l for l in path.read_text().splitlines() if l.startswith(prefix)]
        if lines:
            return lines[0]
        time.sleep(0.2)
    return None


def main(engine: str, out: str) -> int:
    from PIL import Image

    from catome_export.serve.loadtest import in_isolated_network, listening_addresses, post, process_commands

    if not in_isolated_network():
        print("refusing to start Ray outside a loopback-only network namespace", file=sys.stderr)
        return 2
    stdout_path, stderr_path = Path(out).with_suffix(".log"), Path(out).with_suffix(".err")
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "catome_export.cli.main", "serve", "--engine", engine, "--steps", "2",
                                 "--threads", "1", "--max-ongoing-requests", "1", "--max-queued-requests", "1",
                                 "--request-timeout", str(REQUEST_TIMEOUT_S), "--drain-timeout",
                                 str(DRAIN_TIMEOUT_S)], stdout=stdout, stderr=stderr, cwd=str(ROOT))
    result: dict[str, Any] = {"url_line": None}
    try:
        result["url_line"] = wait_for_line(stdout_path, "serving ", proc, 600)
        if result["url_line"] is not None:
            result["listening"] = listening_addresses()
            ray_temp = ray_temp_dir()
            result["ray_temp_found"] = ray_temp is not None
            reply = post(PORT, "/v1/images/generations", {"prompt": "a red fox in the snow", "n": 1, "size": SIZE,
                                                          "response_format": "b64_json"})
            result["status"] = reply.status
            data = reply.body.get("data", [])
            result["images"] = len(data)
            if data:
                result["png_size"] = list(Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))).size)
            metrics = wait_for_line(stdout_path, "metrics: ", proc, 5)
            result["metrics_line"] = metrics
            result.update(phases(ray_temp or "", proc, stderr_path, metrics))
    finally:
        if proc.poll() is None and "drain_line" not in result:  # not signalled yet (a phase failed)
            proc.send_signal(signal.SIGTERM)
        try:
            result["rc"] = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            result["rc"] = "timeout"
    err = stderr_path.read_text().strip().splitlines()
    result["stderr_lines"] = [l for l in err if l.startswith(("stopping:", "drained:", "drain timeout:", "stopped:"))]
    result["note_lines"] = [l for l in err if l.startswith("note:")]
    result["last_stderr_line"] = err[-1] if err else ""
    result["stderr_tail"] = "\n".join(err[-30:])
    time.sleep(2)
    me = os.getpid()
    result["ray_processes_left"] = [cmd[:120] for pid, cmd in process_commands().items()
                                    if pid != me and "ray" in cmd]
    Path(out).write_text(json.dumps(result, indent=2))
    return 0


def outcomes(metrics: str | None, timeout_s: float = 40.0) -> dict[str, float]:
    """Requests by outcome, as the metrics URL the command printed exports them, once the time-out is counted
    (Ray exports records within about ten seconds)."""
    from catome_export.serve.loadtest import metric_sums, scrape

    if metrics is None:
        return {}
    url = metrics.split()[1]
    counted: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sums = metric_sums(scrape(url), by=("outcome",))
        counted = {k.split("outcome=")[1].rstrip("}"): v for k, v in sums.items()
                   if k.startswith("ray_catome_requests_total{outcome=")}
        if counted.get("timeout"):
            break
        time.sleep(2)
    return counted


def phases(ray_temp: str, proc: subprocess.Popen, stderr_path: Path, metrics: str | None) -> dict[str, Any]:
    from catome_export.serve.loadtest import post

    out: dict[str, Any] = {}
    base = {"prompt": "a red fox in the snow", "size": SIZE}
    # steps per second of this machine now: two generations, 20 and 120 steps, the difference of their times
    times = {}
    for steps in (20, 120):
        reply = post(PORT, "/v1/images/generations", {**base, "seed": 0, "steps": steps})
        times[steps] = reply.body["catome"]["images"][0]["generation_ms"] / 1e3 if reply.status == 200 else None
    if None in times.values():
        out["calibration"] = {"failed": times}
        return out
    per_step = max(1e-4, (times[120] - times[20]) / 100)

    def work(units: float, offset: int, n: int = 1) -> dict[str, Any]:
        """A request of ``n`` images, about ``units`` L of generation in all; its steps count ends in ``offset``
        (unique to the request) and is at most 999."""
        steps = units * UNIT_S / per_step / n
        return {**base, "n": n, "steps": min(990, max(10, int(steps) // 10 * 10)) + offset}

    out["calibration"] = {"per_step_ms": round(per_step * 1e3, 3), "times_s": times}
    # 1. backpressure: A runs, B waits, C finds the queue full; B's client goes away before A ends
    a = Background({**work(3, 1), "seed": 1})
    time.sleep(1.0)
    b_payload = {**work(1, 2), "seed": 2}
    b_socket = open_and_leave(b_payload)
    time.sleep(0.5)
    c = post(PORT, "/v1/images/generations", {**work(1, 3), "seed": 3})
    out["queue_full"] = summary(c)
    b_socket.close()
    out["queued_request"] = summary(a.wait())
    # 2. time-out: D needs 8 images of 2 L each, far over the 8 s limit: 504, and its images not yet started are
    # dropped
    d_payload = {**work(16, 4, n=8), "seed": 4}
    out["timeout"] = {**summary(post(PORT, "/v1/images/generations", d_payload)), "n": d_payload["n"]}
    # the pipeline call under way when it timed out ends before this small one runs
    out["after_timeout"] = summary(post(PORT, "/v1/images/generations", {**base, "seed": 8, "steps": 2}))
    out["disconnected_generations"] = generations(ray_temp, b_payload["steps"])
    out["timed_out_generations"] = generations(ray_temp, d_payload["steps"])
    out["timed_out_images"] = d_payload["n"]
    out["outcomes"] = outcomes(metrics)
    # 3. SIGTERM with E running (about 1 L: finishes within the drain) and F waiting (8 images, 10 L: does not)
    e = Background({**work(1, 5), "seed": 5})
    time.sleep(0.5)
    f = Background({**work(10, 6, n=8), "seed": 6})
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    line = wait_for_line(stderr_path, "stopping:", proc, 30)
    out["drain_line"] = line
    g = post(PORT, "/v1/images/generations", {**base, "seed": 7}, timeout=30)
    out["during_drain"] = summary(g)
    out["finished_in_drain"] = summary(e.wait())
    f_reply = f.wait()
    out["past_the_drain"] = {**summary(f_reply), "after_signal_s": None if f.answered_at is None
                             else round(f.answered_at - signalled, 2)}
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
