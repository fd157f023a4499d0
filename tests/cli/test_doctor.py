"""The command line as a user runs it: --help, --version, doctor, and argparse errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from catome_export import __version__


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "catome_export.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_help_lists_doctor():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    assert "usage: catome-export" in out.stdout and "doctor" in out.stdout


def test_no_command_prints_help(capsys):
    from catome_export.cli.main import main

    assert main([]) == 0
    assert "usage: catome-export" in capsys.readouterr().out


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"catome-export {__version__}"


@pytest.mark.slow
def test_doctor_reports_and_exits_by_core_packages():
    out = run_cli("doctor")
    assert out.returncode == 0, out.stdout + out.stderr  # torch, diffusers and onnx are installed here
    for name in ("python", "torch", "diffusers", "onnx", "onnxruntime", "tensorrt", "cuda device"):
        assert name in out.stdout
    assert "usable backends:" in out.stdout and "eager torch" in out.stdout
    assert "Traceback" not in out.stderr


def test_doctor_exit_1_when_a_core_package_is_missing(monkeypatch, capsys):
    from catome_export.cli import cmd_doctor
    from catome_export.cli.main import main

    real = cmd_doctor._version
    monkeypatch.setattr(cmd_doctor, "_version",
                        lambda module: (False, "not importable") if module == "diffusers" else real(module))
    assert main(["doctor"]) == 1
    assert "pip install diffusers" in capsys.readouterr().out


def test_unknown_option_exits_2_with_usage():
    out = run_cli("--no-such-option")
    assert out.returncode == 2
    assert "usage:" in out.stderr and "unrecognized arguments" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_command_exits_2(capsys):
    from catome_export.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["transmogrify"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
