"""``catome-export verify``: table and summary, exit 0 on a good engine, exit 1 above tolerance or when damaged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from catome_export.cli.main import main

ARGS = ["--steps", "3", "--backend", "ort", "--threads", "1", "--batch", "1", "--resolution", "128"]


def test_verify_good_engine_exits_0(tiny_engine, capsys, tmp_path):
    report = tmp_path / "report.json"
    assert main(["verify", str(tiny_engine), *ARGS, "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "max|diff|" in out and "verify OK: 3 steps" in out and "latency per step" in out
    rows = [line for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 3 and all(line.endswith(" ok") for line in rows)
    data = json.loads(report.read_text())
    assert data["ok"] is True and len(data["rows"]) == 3


def test_verify_above_tolerance_exits_1(tiny_engine, capsys, monkeypatch):
    from catome_export.runtime.runtime import Runtime

    original = Runtime.step
    monkeypatch.setattr(Runtime, "step", lambda self, *a, **k: original(self, *a, **k) * 1.01 + 1e-3)
    assert main(["verify", str(tiny_engine), *ARGS, "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "verify FAILED" in out and "above the limit" in out
    assert "max|diff|" not in out  # --quiet: no table


def test_verify_damaged_engine_exits_1_without_traceback(tiny_engine, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_engine, damaged)
    (damaged / "stage_5.onnx").write_bytes(b"truncated")
    proc = subprocess.run([sys.executable, "-m", "catome_export.cli", "verify", str(damaged), *ARGS],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "catome-export build" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_verify_bad_arguments_exit_1(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["verify", str(tmp_path), "--resolution", "big"])
    assert info.value.code == 2
