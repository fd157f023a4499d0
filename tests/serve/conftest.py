"""Fixtures of the serve tests that start Ray.

Ray runs only inside new network and PID namespaces (``unshare -n -p -f
--mount-proc`` with ``lo`` up): nothing but loopback is reachable, and every
process Ray starts ends when the scenario's process does. ``ray_isolation``
skips with a reason where ray[serve] is missing or such a namespace cannot be
made; ``ray_env`` turns usage reports and Ray's memory monitor off;
``ray_temp_dir`` is a short folder for Ray's files and token, removed after.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from typing import Iterator

import pytest


def _skip_reason() -> str | None:
    """Why the Ray tests cannot run here, or None."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        return "ray[serve] is not installed (pip install 'catome-export[serve]')"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip is missing: the Ray tests run in a loopback-only network namespace"
    try:
        probe = subprocess.run(["unshare", "-n", "-p", "-f", "--mount-proc", "sh", "-c", "ip link set lo up"],
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot make an isolated network namespace ({exc})"
    if probe.returncode != 0:
        return f"cannot make an isolated network namespace (unshare -n needs root): {probe.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="session")
def ray_isolation() -> None:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def ray_env() -> dict[str, str]:
    """The environment of a Ray test: no usage reports, no memory monitor (other work shares the machine's memory),
    a longer wait for the raylet (a busy CI machine starts it slowly)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0", "RAY_memory_monitor_refresh_ms": "0",
            "RAY_raylet_start_wait_time_s": "120"}


@pytest.fixture
def ray_temp_dir() -> Iterator[str]:
    """A short temp folder for Ray's files and token (/tmp/rs-*), removed at the end."""
    folder = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
