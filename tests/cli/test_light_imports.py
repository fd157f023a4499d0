"""``--help`` and ``doctor`` work where torch, onnx, onnxruntime and diffusers are missing.

The subprocess installs a ``sys.meta_path`` finder that raises ImportError for
those packages before anything of catome_export is imported, then runs the
CLI's ``main`` as the console script would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BLOCKED = ("torch", "onnx", "onnxruntime", "diffusers", "onnxscript")

_RUNNER = textwrap.dedent(
    """
    import sys

    BLOCKED = set(sys.argv[1].split(","))

    class _Missing:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, _Missing())
    from catome_export.cli.main import main

    code = main(sys.argv[2:])
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    if leaked:
        print(f"imported although blocked: {leaked}", file=sys.stderr)
        code = 99
    sys.exit(code)
    """
)

REPO = Path(__file__).resolve().parents[2]


def run_without(blocked: tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    return subprocess.run([sys.executable, "-c", _RUNNER, ",".join(blocked), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_help_without_heavy_packages_matches_full_help():
    light = run_without(BLOCKED, "--help")
    assert light.returncode == 0, light.stderr
    assert "Traceback" not in light.stderr
    full = run_without((), "--help")
    assert full.returncode == 0, full.stderr
    assert light.stdout == full.stdout  # every command is still listed
    for command in ("build", "verify", "bench", "generate", "analyze", "eval", "doctor"):
        assert command in light.stdout


@pytest.mark.parametrize("command", ["build", "verify", "bench", "generate", "analyze", "eval", "doctor"])
def test_command_help_without_heavy_packages(command):
    out = run_without(BLOCKED, command, "--help")
    assert out.returncode == 0, out.stderr
    assert f"usage: catome-export {command}" in out.stdout


def test_doctor_without_heavy_packages_says_what_is_missing_and_how_to_install():
    out = run_without(BLOCKED, "doctor")
    assert out.returncode == 1, out.stdout + out.stderr  # a core package is missing
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stdout.splitlines()
    for name in ("torch", "diffusers", "onnx", "onnxruntime"):
        row = next(i for i, line in enumerate(lines) if line.split()[:2] == ["--", name])
        assert "not importable" in lines[row]
        assert "to get it: pip install" in lines[row + 1], lines[row + 1]
    assert "pip install 'catome-export[ort]'" in out.stdout
    assert "usable backends: none" in out.stdout
