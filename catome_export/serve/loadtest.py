"""Load and reliability checks of a running service on 127.0.0.1 (used by scripts/serve_load.py and the tests).

- :func:`post` / :func:`get`: one HTTP call to ``127.0.0.1`` (never another host).
- :func:`run_load`: generation requests from ``concurrency`` clients, a fixed
  count or for a while, every ``bad_every``-th one a bad body of
  :data:`BAD_REQUESTS`; :class:`LoadResult` keeps every :class:`Answer` and
  sums them up (good requests answered, shed and failed, their latency, each
  bad case's statuses, answers not in the API's shape: :func:`shape_problem`);
  :class:`MemorySampler`: the replicas' resident memory while it runs.
- :func:`outcome_deltas`, :func:`compare_counts`: the ingress's request metrics
  against what the clients saw (:func:`client_outcome`).
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


BAD_REQUESTS: list[tuple[str, bytes]] = [
    ("malformed JSON", b'{"prompt": '),
    ("missing prompt", b'{"n": 1}'),
    ("n = 0", b'{"prompt": "a red fox", "n": 0}'),
    ("n above the limit", b'{"prompt": "a red fox", "n": 1000}'),
    ("size not a multiple of 8", b'{"prompt": "a red fox", "size": "100x100"}'),
    ("size outside the built range", b'{"prompt": "a red fox", "size": "4096x4096"}'),
    ("steps = 0", b'{"prompt": "a red fox", "steps": 0}'),
    ("wrong type", b'{"prompt": "a red fox", "guidance_scale": "high"}'),
    ("lone surrogate in prompt", b'{"prompt": "\\ud800"}'),
    ("lone surrogate in negative_prompt", b'{"prompt": "a red fox", "negative_prompt": "\\ud800"}'),
    ("steps = 1000", b'{"prompt": "a red fox", "steps": 1000}'),
    ("guidance_scale 1e30", b'{"prompt": "a red fox", "guidance_scale": 1e30}'),
    ("guidance_scale 1e308", b'{"prompt": "a red fox", "guidance_scale": 1e308}'),
    ("5000-digit integer", b'{"prompt": "a red fox", "seed": 1' + b"0" * 4999 + b"}"),
    ("100000-deep nesting", b'{"prompt": "a red fox", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("bad UTF-8", b'{"prompt": "a red \xff\xfe fox"}'),
]
"""Request bodies the service must refuse with a 4xx in the API's error shape, as raw bytes (JSON escapes, not
Python strings: ``\\ud800`` reaches the server as the six characters of a lone surrogate's escape). The first
eight are malformed or out-of-range fields; the rest are the inputs that once broke a replica or escaped the
parser (issue 23): a lone surrogate in either prompt, steps past the most the tiny engine's PNDM scheduler runs
(999), a guidance scale that overflows, an integer of more digits than Python reads, nesting deeper than the
parser goes, and a body that is not UTF-8."""

RETRY_AFTER_CODES = ("queue_full", "replica_lost", "shutting_down", "unavailable")
"""``error.code`` of the answers that carry ``Retry-After`` (docs/serving.md, "Busy, slow, lost and stopping")."""
SHED_CODES = ("queue_full", "replica_lost", "shutting_down", "unavailable")
"""``error.code`` of a 429 or 503: the service turned the request away without looking at it (shed, not failed)."""
ERROR_KEYS = ("code", "message", "param", "type")
"""The keys of the API's ``error`` object."""


def bad_case(index: int, bad_every: int, cases: int) -> int | None:
    """Which bad case (an index into a list of ``cases``) request ``index`` of a mixed load sends, or None for a
    good request: every ``bad_every``-th request is bad (requests ``bad_every - 1``, ``2 * bad_every - 1``, ...),
    cycling through the cases in order; ``bad_every`` 0: none."""
    if bad_every <= 0 or cases <= 0 or (index + 1) % bad_every:
        return None
    return (index // bad_every) % cases


@dataclass(frozen=True)
class Answer:
    """What became of one request of a load, as its client saw it."""

    index: int
    status: int
    """HTTP status; 0 where no HTTP answer came (connection refused or reset, client timeout)."""
    seconds: float
    case: str | None = None
    """The bad case it sent (:data:`BAD_REQUESTS`), None for a good request."""
    code: str | None = None
    """``error.code`` of an error answer."""
    problem: str | None = None
    """Why the answer is not in the API's shape (:func:`shape_problem`), None where it is."""
    retry_after: str | None = None
    message: str | None = None
    """``error.message`` (or the first characters of a body that is not JSON)."""
    seeded: bool = True
    """Whether the request named its seed (the service sends such a request once more when its replica is lost)."""
    request_id: str | None = None

    @property
    def good(self) -> bool:
        return self.case is None

    @property
    def answered(self) -> bool:
        """A good request's images came (HTTP 200 in the API's shape)."""
        return self.status == 200 and self.problem is None

    @property
    def shed(self) -> bool:
        """Turned away by the service's limits or state (429 or 503 with a code of :data:`SHED_CODES`), in the API's
        shape."""
        return self.status in (429, 503) and self.code in SHED_CODES and self.problem is None


def shape_problem(reply: Reply, images: int = 1) -> str | None:
    """None where ``reply`` is in the API's shape: a 200 with its ``images`` images (``data[i].b64_json``), or an
    error ``{"error": {"code", "message", "param", "type"}}`` carrying ``Retry-After`` (whole seconds) where its
    code is one of :data:`RETRY_AFTER_CODES`; else what is wrong, in a few words."""
    if reply.status == 0:
        return "no HTTP answer: " + str((reply.body.get("error") or {}).get("message"))[:120]
    if "raw" in reply.body:
        return f"HTTP {reply.status}, not JSON: {str(reply.body['raw'])[:80]!r}"
    if reply.status == 200:
        data = reply.body.get("data")
        if not isinstance(data, list) or len(data) != images or \
                not all(isinstance(d, dict) and isinstance(d.get("b64_json"), str) for d in data):
            return f"HTTP 200 without its {images} image(s)"
        return None
    error = reply.body.get("error")
    if not isinstance(error, dict) or tuple(sorted(error)) != ERROR_KEYS:
        return f"HTTP {reply.status}, not the API's error shape: {str(reply.body)[:80]}"
    if error.get("code") in RETRY_AFTER_CODES and not str(reply.headers.get("retry-after", "")).isdigit():
        return f"HTTP {reply.status} {error.get('code')} without Retry-After"
    return None


def answer_of(index: int, reply: Reply, images: int = 1, case: str | None = None, seeded: bool = True) -> Answer:
    error = reply.body.get("error") if reply.status != 200 else None
    message = error.get("message") if isinstance(error, dict) else None
    if "raw" in reply.body:
        message = str(reply.body["raw"])[:200]
    return Answer(index=index, status=reply.status, seconds=reply.seconds, case=case,
                  code=error.get("code") if isinstance(error, dict) else None, problem=shape_problem(reply, images),
                  retry_after=reply.headers.get("retry-after"), message=message, seeded=seeded,
                  request_id=reply.request_id)


def client_outcome(answer: Answer) -> str:
    """What became of a request, in the terms of the ingress's ``catome_requests_total`` outcomes
    (:data:`catome_export.serve.metrics.OUTCOMES`), as far as a client can tell: ``failed`` (5xx from a replica)
    and ``error`` (the ingress's own 500) are one, ``failed_or_error``; ``no_answer`` and ``not_json`` are answers
    the ingress never gives."""
    if answer.status == 0:
        return "no_answer"
    if answer.problem is not None and "not JSON" in answer.problem:
        return "not_json"
    if answer.status < 400:
        return "ok"
    if answer.code in ("queue_full", "timeout", "replica_lost", "shutting_down", "unavailable"):
        return answer.code
    return "invalid" if answer.status < 500 else "failed_or_error"


def _latency(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_s": None, "p99_s": None, "mean_s": None, "max_s": None}
    return {"p50_s": round(percentile(values, 50), 4), "p99_s": round(percentile(values, 99), 4),
            "mean_s": round(statistics.fmean(values), 4), "max_s": round(max(values), 4)}


def count_by(keys: Any) -> dict[str, int]:
    """How often each key occurs (as text), in key order."""
    out: dict[str, int] = {}
    for key in keys:
        out[str(key)] = out.get(str(key), 0) + 1
    return dict(sorted(out.items()))


@dataclass
class LoadResult:
    """Every answer of a load (:func:`run_load`), and what they add up to (:meth:`summary`)."""

    concurrency: int
    wall_s: float = 0.0
    answers: list[Answer] = field(default_factory=list)
    requests: int | None = None
    """Requests asked for (a load of a fixed count), or None."""
    duration_s: float | None = None
    """Seconds asked for (a timed load), or None."""
    bad_every: int = 0
    cases: tuple[str, ...] = ()
    """Names of the bad cases the load cycled through."""

    @property
    def request_ids(self) -> list[str]:
        """``x-request-id`` of every answered good request (:func:`answered_by` finds the replica of each)."""
        return [a.request_id for a in self.answers if a.good and a.answered and a.request_id]

    def outcomes(self) -> dict[str, int]:
        """Answers by :func:`client_outcome`."""
        return count_by(client_outcome(a) for a in self.answers)

    def summary(self) -> dict[str, Any]:
        """Good requests: answered, shed (429/503 in the API's shape, by code) and failed (anything else; these are
        the load's ``errors``), the latency of those answered; bad requests: each case's statuses, and those not
        answered with a 4xx; every answer not in the API's shape; the answers by outcome."""
        good = [a for a in self.answers if a.good]
        answered = [a for a in good if a.answered]
        shed = [a for a in good if a.shed]
        failed = [a for a in good if not a.answered and not a.shed]
        bad = [a for a in self.answers if not a.good]
        not_4xx = [a for a in bad if not 400 <= a.status < 500]
        wrong_shape = [a for a in self.answers if a.problem is not None]
        cases: dict[str, dict[str, Any]] = {name: {"sent": 0, "statuses": {}} for name in self.cases}
        for a in bad:
            entry = cases.setdefault(str(a.case), {"sent": 0, "statuses": {}})
            entry["sent"] += 1
            entry["statuses"][str(a.status)] = entry["statuses"].get(str(a.status), 0) + 1
        out: dict[str, Any] = {
            "requests": len(self.answers), "concurrency": self.concurrency, "wall_s": round(self.wall_s, 3),
            "asked": {"requests": self.requests, "duration_s": self.duration_s, "bad_every": self.bad_every},
            "statuses": count_by(a.status for a in self.answers), "outcomes": self.outcomes(),
            "ok": len(answered), "errors": len(failed), "shed": len(shed),
            "shed_by_code": count_by(f"{a.status} {a.code}" for a in shed),
            "first_errors": [f"request {a.index}: HTTP {a.status}: {a.problem or a.message}" for a in failed[:5]],
            "throughput_rps": round(len(answered) / self.wall_s, 3) if self.wall_s else 0.0,
            **_latency([a.seconds for a in answered]),
            "good": {"sent": len(good), "answered": len(answered), "shed": len(shed), "failed": len(failed)},
            "not_api_shape": len(wrong_shape),
            "first_not_api_shape": [f"request {a.index} ({a.case or 'good'}): {a.problem}" for a in wrong_shape[:5]],
        }
        if self.bad_every or bad:
            out["bad"] = {"sent": len(bad), "all_4xx": not not_4xx, "cases": cases,
                          "cases_not_sent": [name for name, entry in cases.items() if not entry["sent"]],
                          "not_4xx": [{"request": a.index, "case": a.case, "status": a.status,
                                       "message": (a.problem or a.message or "")[:200]} for a in not_4xx]}
        return out


def run_load(port: int, payload: Callable[[int], dict[str, Any]], concurrency: int, requests: int | None = None,
             duration_s: float | None = None, bad_every: int = 0,
             bad_requests: list[tuple[str, bytes]] | None = None, during: Callable[[int], None] | None = None,
             timeout: float = 300.0) -> LoadResult:
    """``concurrency`` clients send requests until ``requests`` have been sent or ``duration_s`` seconds have passed
    (a request sent before the end is waited for); request ``i`` is ``payload(i)``, or, every ``bad_every``-th,
    the next body of ``bad_requests`` (:func:`bad_case`). ``during(i)`` runs just before request ``i`` is sent."""
    if (requests is None) == (duration_s is None):
        raise ValueError("give either requests or duration_s")
    cases = BAD_REQUESTS if bad_requests is None else bad_requests
    result = LoadResult(concurrency=concurrency, requests=requests, duration_s=duration_s, bad_every=bad_every,
                        cases=tuple(name for name, _ in cases) if bad_every else ())
    lock = threading.Lock()
    counter = iter(range(requests if requests is not None else 2**62))
    start = time.perf_counter()
    end = start + duration_s if duration_s is not None else float("inf")

    def client() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None or time.perf_counter() >= end:
                return
            if during is not None:
                during(index)
            which = bad_case(index, bad_every, len(cases))
            if which is None:
                body = payload(index)
                reply = post(port, "/v1/images/generations", body, timeout=timeout)
                answer = answer_of(index, reply, int(body.get("n", 1)), seeded=body.get("seed") is not None)
            else:
                name, raw = cases[which]
                reply = post(port, "/v1/images/generations", raw, timeout=timeout)
                answer = answer_of(index, reply, case=name)
            with lock:
                result.answers.append(answer)

    threads = [threading.Thread(target=client, name=f"load-{k}", daemon=True) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.wall_s = time.perf_counter() - start
    result.answers.sort(key=lambda a: a.index)
    return result


def replica_loss_summary(answers: list[Answer]) -> dict[str, Any]:
    """The answers of a load during which a replica was killed: every one must be in the API's shape (never Serve's
    plain-text or empty 500), and every one but a 200 a 503 ``replica_lost`` with ``Retry-After`` (a request lost
    with its replica that was not sent once more); a seeded request is sent once more, so it is lost only when
    that fails too."""
    wrong_shape = [a for a in answers if a.problem is not None]
    lost = [a for a in answers if a.status == 503 and a.code == "replica_lost" and a.problem is None]
    other = [a for a in answers if a.status != 200 and a not in lost]
    return {"answers": len(answers), "statuses": count_by(a.status for a in answers),
            "plain_text_500s": sum(1 for a in wrong_shape if a.status == 500),
            "not_api_shape": [f"request {a.index}: {a.problem}" for a in wrong_shape],
            "lost_503": len(lost), "lost_503_seeded": sum(1 for a in lost if a.seeded),
            "other_non_200": [f"request {a.index}: HTTP {a.status} {a.code}: {a.problem or a.message}"
                              for a in other]}


def outcome_deltas(before: dict[str, float], after: dict[str, float], name: str = "ray_catome_requests_total"
                   ) -> dict[str, int]:
    """How many requests the ingress counted by outcome between two :func:`metric_sums`, ``failed`` and ``error``
    as one ``failed_or_error`` (as :func:`client_outcome` sees them)."""
    out: dict[str, int] = {}
    prefix = name + "{outcome="
    for key in set(before) | set(after):
        if key.startswith(prefix):
            outcome = key[len(prefix):-1]
            outcome = "failed_or_error" if outcome in ("failed", "error") else outcome
            delta = int(round(after.get(key, 0.0) - before.get(key, 0.0)))
            if delta:
                out[outcome] = out.get(outcome, 0) + delta
    return dict(sorted(out.items()))


def compare_counts(client: dict[str, int], metrics: dict[str, int]) -> dict[str, Any]:
    """The client's counts beside the metrics' (by outcome, or any key): ``consistent`` when they are equal key for
    key (a missing key is 0), and ``differences`` {key: [client, metrics]} where they are not."""
    keys = sorted(set(client) | set(metrics))
    differences = {k: [client.get(k, 0), metrics.get(k, 0)] for k in keys if client.get(k, 0) != metrics.get(k, 0)}
    return {"consistent": not differences, "client": dict(sorted(client.items())),
            "metrics": dict(sorted(metrics.items())), "differences": differences}


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
