"""Fixtures of the reliability tests: one tiny engine per session, copies of it to damage, a runtime over it.

``reliability_engine`` is the tiny ONNX Runtime engine (128..192 px, batch
1..2, built without verification) under the same name in the session's temp
folder as the runtime and CLI tests' engine, so a full run builds it once.
Tests never change it: the ones that damage an engine work on
``engine_copy`` (a fresh copy per test).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def reliability_engine(tiny_engine) -> Path:
    """The shared tiny engine folder (tests/conftest.py); read-only for the tests."""
    return tiny_engine


@pytest.fixture
def engine_copy(reliability_engine, tmp_path) -> Path:
    """A copy of the tiny engine in this test's temp folder (``<tmp>/engines/tiny``), free to damage."""
    target = tmp_path / "engines" / "tiny"
    shutil.copytree(reliability_engine, target)
    return target


@pytest.fixture(scope="module")
def ort_runtime(reliability_engine):
    """A Runtime over the tiny engine on ONNX Runtime CPU (one intra-op thread)."""
    from catome_export.runtime import Runtime

    runtime = Runtime.load(reliability_engine, backend="ort", backend_options={"intra_op_threads": 1})
    yield runtime
    runtime.close()


def python_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python: this checkout first on the path, one thread, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run_cli_process(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``python -m catome_export.cli ARGS`` in a child process (stdout and stderr captured as text)."""
    return subprocess.run([sys.executable, "-m", "catome_export.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=python_env(**env), cwd=str(REPO))


@pytest.fixture(scope="session")
def cli_process() -> Callable[..., subprocess.CompletedProcess]:
    """``cli_process(args, timeout=300, **env)``: run the real command line in a child process."""
    return run_cli_process


@pytest.fixture(scope="session")
def child_env() -> Callable[..., dict[str, str]]:
    """``child_env(**extra)``: the environment for child Python processes of the tests."""
    return python_env
