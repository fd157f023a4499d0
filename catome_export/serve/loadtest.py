"""Load and reliability checks of a running service on 127.0.0.1 (used by scripts/serve_load.py and the tests).

- :func:`post` / :func:`get`: one HTTP call to ``127.0.0.1`` (never another host).
- :func:`run_load`: ``requests`` generation requests, ``concurrency`` at a time;
  latency per request, errors, and the resident memory of the replicas sampled
  while it runs.
- :func:`replica_logs`, :func:`live_replica_pids`, :func:`answered_by`: which
  replica processes there are and which one answered a request, from Serve's
  log file of each replica (responses name no process: the replica logs its pid,
  and Serve logs every request's ``x-request-id`` there).
- :func:`isolated_command`: the command line that runs a script in a network
  namespace with only a loopback interface (and its own PID namespace, so every
  process Ray starts ends with it); :func:`listening_addresses` lists what
  listens there.
- :func:`cpu_use`: which replica process is working (CPU time over a moment).
- :func:`scrape`, :func:`metric_sums`: the service's Prometheus metrics.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import statistics
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    seconds: float
    request_id: str | None = None
    """Serve's ``x-request-id`` of the answer (the replica's log file names it)."""
    headers: dict[str, str] = field(default_factory=dict)
    """The answer's headers, names in lower case."""


def _call(method: str, port: int, path: str, data: bytes | None, timeout: float) -> Reply:
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw, status, headers = response.read(), response.status, response.headers
    except urllib.error.HTTPError as exc:
        raw, status, headers = exc.read(), exc.code, exc.headers
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        return Reply(0, {"error": {"message": f"{type(exc).__name__}: {exc}"}}, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    try:
        body = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        body = {"raw": raw[:200].decode("utf-8", "replace")}
    return Reply(status, body if isinstance(body, dict) else {"raw": body}, seconds, headers.get("x-request-id"),
                 {k.lower(): v for k, v in headers.items()})


def post(port: int, path: str, payload: dict[str, Any] | bytes, timeout: float = 300.0) -> Reply:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return _call("POST", port, path, data, timeout)


def get(port: int, path: str, timeout: float = 30.0) -> Reply:
    return _call("GET", port, path, None, timeout)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))
    return ordered[min(rank, len(ordered)) - 1]


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (VmRSS in /proc), or None where it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_commands() -> dict[int, str]:
    """pid -> command line of every process this PID namespace shows in /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    out[int(entry)] = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            except OSError:
                continue
    return out


class MemorySampler:
    """Samples the resident memory of the given pids every period."""

    def __init__(self, pids: Callable[[], list[int]], period_s: float = 0.5) -> None:
        self.pids = pids
        self.period_s = period_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._start = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = {}
            for pid in self.pids():
                value = rss_bytes(pid)
                if value is not None:
                    rss[str(pid)] = value
            self.samples.append({"t_s": round(time.perf_counter() - self._start, 3), "rss_bytes": rss})
            self._stop.wait(self.period_s)

    def __enter__(self) -> "MemorySampler":
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    wall_s: float
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    """``x-request-id`` of every answered request (:func:`answered_by` finds the replica of each)."""

    def summary(self) -> dict[str, Any]:
        ok = self.latencies_s
        return {
            "requests": self.requests, "concurrency": self.concurrency, "wall_s": round(self.wall_s, 3),
            "ok": len(ok), "errors": len(self.errors), "statuses": self.statuses,
            "first_errors": self.errors[:5], "throughput_rps": round(len(ok) / self.wall_s, 3) if self.wall_s else 0,
            "p50_s": round(percentile(ok, 50), 4) if ok else None, "p99_s": round(percentile(ok, 99), 4) if ok else None,
            "mean_s": round(statistics.fmean(ok), 4) if ok else None, "max_s": round(max(ok), 4) if ok else None,
        }


def run_load(port: int, payload: Callable[[int], dict[str, Any]], requests: int, concurrency: int,
             during: Callable[[int], None] | None = None, timeout: float = 300.0) -> LoadResult:
    """``requests`` POSTs of ``payload(i)``, ``concurrency`` at a time; ``during(i)`` runs after request i is sent."""
    result = LoadResult(requests=requests, concurrency=concurrency, wall_s=0.0)
    lock = threading.Lock()

    def one(i: int) -> None:
        if during is not None:
            during(i)
        reply = post(port, "/v1/images/generations", payload(i), timeout=timeout)
        with lock:
            result.statuses[str(reply.status)] = result.statuses.get(str(reply.status), 0) + 1
            if reply.status == 200 and len(reply.body.get("data", [])) == payload(i).get("n", 1):
                result.latencies_s.append(reply.seconds)
                if reply.request_id:
                    result.request_ids.append(reply.request_id)
            else:
                message = (reply.body.get("error") or {}).get("message") if isinstance(reply.body, dict) else None
                result.errors.append(f"request {i}: HTTP {reply.status}: {message or str(reply.body)[:200]}")

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="load") as pool:
        list(pool.map(one, range(requests)))
    result.wall_s = time.perf_counter() - start
    return result


REPLICA_PID_LINE = re.compile(r"replica pid (\d+): engine ")
"""The line a replica logs when its engine is loaded (catome_export.serve.service)."""


@dataclass
class ReplicaLog:
    """Serve's log file of one replica."""

    path: Path
    pid: int | None
    """From the replica's "replica pid N: engine ... loaded" line; None until it has loaded."""
    text: str


def replica_logs(ray_temp: str | Path) -> list[ReplicaLog]:
    """Every replica's Serve log file of the Ray session whose temp folder is ``ray_temp``
    (``session_latest/logs/serve/replica_*.log``), replicas that have died included."""
    folder = Path(ray_temp) / "session_latest" / "logs" / "serve"
    logs = []
    for path in sorted(folder.glob("replica_*.log")):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        found = REPLICA_PID_LINE.search(text)
        logs.append(ReplicaLog(path, int(found.group(1)) if found else None, text))
    return logs


def live_replica_pids(ray_temp: str | Path) -> list[int]:
    """Pids of the replicas that have loaded their engine and still run (in this PID namespace)."""
    return sorted(log.pid for log in replica_logs(ray_temp) if log.pid is not None and rss_bytes(log.pid) is not None)


def answered_by(ray_temp: str | Path, request_ids: list[str]) -> dict[str, int]:
    """request id -> pid of the replica whose log names it (Serve logs each request's id in its replica's file);
    ids not (yet) in any log are left out."""
    logs = [(log.pid, log.text) for log in replica_logs(ray_temp) if log.pid is not None]
    out = {}
    for request_id in request_ids:
        for pid, text in logs:
            if request_id in text:
                out[request_id] = pid
                break
    return out


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(url: str, timeout: float = 10.0) -> list[tuple[str, dict[str, str], float]]:
    """The samples of a Prometheus text export at ``url`` (on 127.0.0.1): (name, labels, value)."""
    if not url.startswith(f"http://{HOST}:"):
        raise ValueError(f"only {HOST} is scraped, not {url}")
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode("utf-8", "replace")
    samples = []
    for line in text.splitlines():
        found = _SAMPLE.match(line.strip()) if line and not line.startswith("#") else None
        if found:
            labels = dict(_LABEL.findall(found.group(2) or ""))
            try:
                samples.append((found.group(1), labels, float(found.group(3))))
            except ValueError:
                continue
    return samples


def metric_sums(samples: list[tuple[str, dict[str, str], float]], prefix: str = "ray_catome_",
                by: tuple[str, ...] = ("outcome", "site")) -> dict[str, float]:
    """Sum of each metric starting with ``prefix`` over its series, split by the labels in ``by`` where present:
    ``{"ray_catome_requests_total{outcome=ok}": 12.0, ...}`` (histogram buckets left out)."""
    out: dict[str, float] = {}
    for name, labels, value in samples:
        if not name.startswith(prefix) or name.endswith("_bucket"):
            continue
        split = ",".join(f"{k}={labels[k]}" for k in by if k in labels)
        key = f"{name}{{{split}}}" if split else name
        out[key] = out.get(key, 0.0) + value
    return dict(sorted(out.items()))


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used, from /proc; None where it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_use(pids: list[int], window_s: float = 0.5) -> dict[int, float]:
    """CPU seconds each of ``pids`` used over ``window_s`` (a replica working on a request uses a core; an idle
    one next to nothing); pids that are gone are left out."""
    before = {pid: cpu_seconds(pid) for pid in pids}
    time.sleep(window_s)
    after = {pid: cpu_seconds(pid) for pid in pids}
    return {pid: after[pid] - before[pid] for pid in pids  # type: ignore[operator]
            if before[pid] is not None and after[pid] is not None}


def listening_addresses() -> dict[str, str]:
    """``address:port`` -> process name of every listening TCP socket in this network namespace (``ss -ltnp``)."""
    import subprocess

    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            name = re.search(r'\(\("([^"]*)"', line)
            found[fields[3]] = name.group(1) if name else ""
    return dict(sorted(found.items()))


def is_loopback(address: str) -> bool:
    """Whether ``address:port`` (as ``ss`` writes it) is on a loopback address: 127.0.0.0/8 or ::1."""
    import ipaddress

    host = address.rsplit(":", 1)[0].strip("[]").split("%")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # "*" (every address)
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


NODE_ADDRESS = "10.254.0.1"
"""The address :func:`isolated_command` gives the namespace's loopback interface with ``node_address=True``."""


def in_isolated_network() -> bool:
    """True where the only network interface is loopback (a fresh ``unshare -n`` namespace with lo up)."""
    try:
        with open("/proc/self/net/dev") as f:
            lines = f.read().splitlines()[2:]
    except OSError:
        return False
    return sorted(line.split(":")[0].strip() for line in lines if ":" in line) == ["lo"]


def isolated_command(argv: list[str], node_address: bool = False) -> list[str]:
    """``argv`` run inside new network and PID namespaces with only loopback up (needs root or user namespaces).

    ``node_address``: the loopback interface also gets :data:`NODE_ADDRESS` and the default route, so that this
    namespace looks like a machine on a network (Ray takes the address of the default route for the node's) while
    every packet still stays on loopback: which of Ray's ports would listen on a machine's network address shows."""
    setup = "ip link set lo up"
    if node_address:
        setup += f" && ip addr add {NODE_ADDRESS}/32 dev lo && ip route add default dev lo"
    inner = setup + " && exec " + " ".join(shlex.quote(a) for a in argv)
    return ["unshare", "-n", "-p", "-f", "--mount-proc", "sh", "-c", inner]
