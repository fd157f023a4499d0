"""Starting the service: a local Ray (or an existing cluster), Serve's HTTP proxy, the application; clean stop.

Used by ``catome-export serve``, the load-test script and the tests.
Usage reports are off (``RAY_USAGE_STATS_ENABLED=0``) unless the
environment says otherwise. A local Ray keeps its session files and its
authentication token in one temporary folder (``temp_dir``, or a new
``/tmp/rs-*`` removed afterwards), not in ``/tmp/ray`` and ``~/.ray``; keep it
short: Ray's unix sockets live under it and a socket path is limited to 107
bytes.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from catome_export.errors import CatomeError

logger = logging.getLogger(__name__)

APP_NAME = "catome"
LOOPBACK = "127.0.0.1"
SOCKET_PATH_ROOM = 50
"""Longest Ray temp folder accepted: Ray adds about 45 characters of socket path under it (limit 107)."""


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None


def require_ray() -> None:
    if not ray_available():
        raise CatomeError("Ray Serve is not installed: pip install \"catome-export[serve]\" (ray[serve] >= 2.40)")


def check_port_free(host: str, port: int) -> None:
    """CatomeError when ``host:port`` cannot be bound (in use, or no such address here)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise CatomeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass a free --port, "
                              "or stop what uses it") from None


SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _node_address_loopback() -> None:
    """Make a local Ray take 127.0.0.1 as its node address, so that its own servers (GCS, raylet, object manager,
    workers, dashboard and runtime-env agents) listen on loopback instead of this machine's network address.

    Ray binds them to the node address, and ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray
    replaces a loopback address with the machine's own address (``resolve_ip_for_localhost``) unless it runs as a
    single-machine Ray, as it does on macOS and Windows. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is that switch
    (read by every Ray process at import, so it goes into the environment the Ray processes inherit, and into the
    already imported module here); on Linux it changes nothing else."""
    import sys

    os.environ[SINGLE_MACHINE_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        setattr(constants, "ENABLE_RAY_CLUSTER", False)


@contextmanager
def ray_session(address: str | None = None, temp_dir: str | None = None, num_cpus: int | None = None,
                log_to_driver: bool = False, metrics_port: int | None = None) -> Iterator[None]:
    """``ray.init`` (a local Ray when ``address`` is None, else join that cluster); ``ray.shutdown`` on exit.
    ``metrics_port``: where a local Ray exports Prometheus metrics (None: a free port it picks).

    A local Ray gets a fresh authentication token in its temp folder; a temp folder made here is removed at the end.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    require_ray()
    if temp_dir is not None and len(str(temp_dir)) > SOCKET_PATH_ROOM:
        raise CatomeError(f"Ray's temp folder {temp_dir} is too long ({len(str(temp_dir))} characters; Ray's unix "
                          f"sockets under it allow about {SOCKET_PATH_ROOM}): use a short one like /tmp/rs-xxxx")
    made = None
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver, "namespace": "catome"}
    if address is None:
        if temp_dir is None:
            temp_dir = made = tempfile.mkdtemp(prefix="rs-", dir="/tmp" if os.path.isdir("/tmp") else None)
        token = os.path.join(str(temp_dir), "auth_token")
        if not os.path.exists(token):
            with open(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = token  # inherited by every Ray process this session starts
        _node_address_loopback()
        kwargs.update(include_dashboard=False, num_cpus=num_cpus, _temp_dir=str(temp_dir),
                      _node_ip_address=LOOPBACK)
        if metrics_port is not None:
            kwargs["_metrics_export_port"] = metrics_port
    else:
        kwargs["address"] = address
    import ray

    try:
        try:
            ray.init(**kwargs)
        except Exception as exc:  # Ray raises plain Exception too (a node that timed out during startup)
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            detail = " ".join(str(exc).split())[:200]
            raise CatomeError(f"cannot start or join {where} ({type(exc).__name__}: {detail}); check the address "
                              "(ray start --head prints it) or leave --address out for a local Ray") from None
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def start_app(app: Any, *, host: str, port: int, local: bool, timeout_s: float = 600.0) -> None:
    """Start Serve's HTTP proxy on ``host:port`` and run ``app`` at ``/``; returns when it is running."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port}, detached=not local)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # serve.run waits for the replicas; this covers an autoscaling start
        status = serve.status().applications.get(APP_NAME)
        if status is not None and str(status.status).endswith("RUNNING"):
            return
        if status is not None and str(status.status).endswith(("DEPLOY_FAILED", "UNHEALTHY")):
            raise CatomeError(f"the application failed to start: {' '.join(str(status.message).split())[:500]}")
        time.sleep(0.5)
    raise CatomeError(f"the application did not start within {timeout_s:.0f} s: look at Ray's logs")


def metrics_url() -> str | None:
    """Where this machine's Ray node exports Prometheus metrics (catome_export.serve.metrics), or None."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("NodeManagerAddress") == LOOPBACK and node.get("MetricsExportPort"):
            return f"http://{LOOPBACK}:{node['MetricsExportPort']}/metrics"
    return None


def stop_app(local: bool) -> None:
    """Local Ray: shut Serve down. Joined cluster: delete only this application."""
    from ray import serve

    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    except Exception as exc:  # stopping must go on whatever Serve says
        logger.warning("stopping Serve: %s: %s", type(exc).__name__, exc)


def _descendants(root: int) -> dict[int, str]:
    """pid -> name (its command line's first word) of ``root`` and every process below it."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out = {}
    for pid in parents:
        ancestor: int | None = pid
        hops = 0
        while ancestor and ancestor != root and hops < 64:
            ancestor, hops = parents.get(ancestor), hops + 1
        if ancestor == root:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out[pid] = f.read().split(b"\0")[0].decode("utf-8", "replace").strip() or str(pid)
            except OSError:
                continue
    return out


def _listening_sockets() -> dict[int, str]:
    """socket inode -> ``address:port`` of every listening TCP socket in this network namespace (/proc/net)."""
    import ipaddress

    out = {}
    for name, width in (("tcp", 8), ("tcp6", 32)):
        try:
            with open(f"/proc/net/{name}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A: LISTEN
                continue
            hex_address, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_address)
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian 32-bit words
            address = ipaddress.ip_address(packed)
            shown = f"[{address}]" if width == 32 else str(address)
            out[int(fields[9])] = f"{shown}:{int(hex_port, 16)}"
    return out


def exposed_ports(exclude_ports: tuple[int, ...] = ()) -> list[tuple[str, str]]:
    """(``address:port``, process) of every TCP port that this process and its children (a local Ray's
    processes) listen on beyond loopback, except ``exclude_ports`` (the HTTP port, whose address is the user's
    choice)."""
    import ipaddress

    sockets = _listening_sockets()
    found = []
    for pid, name in _descendants(os.getpid()).items():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed meanwhile (listdir's own, for one)
                continue
            if not link.startswith("socket:["):
                continue
            address = sockets.get(int(link[8:-1]))
            if address is None:
                continue
            host, port = address.rsplit(":", 1)
            ip = ipaddress.ip_address(host.strip("[]"))
            mapped = getattr(ip, "ipv4_mapped", None)
            if (mapped or ip).is_loopback or int(port) in exclude_ports:
                continue
            found.append((address, name))
    return sorted(set(found))


class StopSignals:
    """While active: Ctrl-C and SIGTERM raise KeyboardInterrupt in the main thread (also where the shell started
    us with SIGINT ignored, as it does for background jobs); after :meth:`ignore` they are ignored, so that a stop
    already under way (Serve's and Ray's shutdown) is not cut short. The previous handlers come back on exit.

    ``ray.init`` installs a SIGTERM handler of its own in the driver (it prints a stack trace and aborts, leaving
    Ray's processes behind): call :meth:`arm` again once Ray has started."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def arm(self) -> None:
        import signal

        for name in self.SIGNALS:
            sig = getattr(signal, name)
            previous = signal.signal(sig, self._raise)
            self._previous.setdefault(sig, previous)

    def __enter__(self) -> "StopSignals":
        self.arm()
        return self

    def ignore(self) -> None:
        import signal

        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def wait_forever(poll_s: float = 1.0) -> None:
    """Sleep until interrupted (inside :class:`StopSignals`: Ctrl-C or SIGTERM raise KeyboardInterrupt)."""
    while True:
        time.sleep(poll_s)


def drain_app(timeout_s: float, announce: Callable[[int], None] | None = None,
              poll_s: float = 0.2) -> tuple[int, int]:
    """Stop the application taking requests and let those in flight finish, for up to ``timeout_s``; then answer
    those still in flight 503 (the ingress's ``drain``, ``in_flight`` and ``abort``). ``announce(n)`` is called
    with the number in flight when the drain begins. Returns (in flight at the start, answered 503 at the end).

    A KeyboardInterrupt (Ctrl-C again) cuts the wait short: whatever is still in flight is answered 503 first."""
    from ray import serve

    handle = serve.get_app_handle(APP_NAME)
    in_flight = started = handle.drain.remote().result(timeout_s=30)
    if announce is not None:
        announce(started)
    deadline = time.monotonic() + timeout_s
    try:
        while in_flight and time.monotonic() < deadline:
            time.sleep(poll_s)
            in_flight = handle.in_flight.remote().result(timeout_s=30)
    except KeyboardInterrupt:
        in_flight = handle.in_flight.remote().result(timeout_s=30)
    aborted = 0
    if in_flight:
        aborted = handle.abort.remote().result(timeout_s=30)
    try:
        settle = time.monotonic() + 10  # the answers of the aborted requests leave the ingress
        while in_flight and time.monotonic() < settle:
            time.sleep(poll_s)
            in_flight = handle.in_flight.remote().result(timeout_s=30)
        if started:
            time.sleep(0.5)  # the last answers pass through Serve's proxy before it is stopped
    except KeyboardInterrupt:  # yet another Ctrl-C: every request has its answer already, stop now
        pass
    return started, aborted
