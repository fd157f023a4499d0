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
    assert main(["verify", "--engine", str(tiny_engine), *ARGS, "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "max|diff|" in out and "verify OK: 3 steps" in out and "latency per step" in out
    rows = [line for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 3 and all(line.endswith(" ok") for line in rows)
    data = json.loads(report.read_text())
    assert data["ok"] is True and len(data["rows"]) == 3
    assert "plan_flips" in data["rows"][0] and isinstance(data["flip_steps"], list)
    assert data["plan_failure_steps"] == []


def _report_with(explained: bool):
    """A two-step report whose step 1 has one plan difference at site 0 (a near-tie flip or not)."""
    from catome_export.runtime.verify import PlanDifference, VerifyReport, VerifyRow

    diff = PlanDifference(site=0, step=1, batch=0, token=37, kind="dst", explained=explained, gap=1e-7,
                          bound=4e-5, detail="src 37 goes to dst 2 on the engine and 4 on eager")
    rows = [VerifyRow(step=i, timestep=900.0 - i, max_abs_diff=1e-6, scale=1.0, limit=1e-4, merged_engine={0: 9},
                      merged_eager={0: 9}, matched_engine={0: True}, matched_eager={0: True}, engine_ms=1.0,
                      eager_ms=2.0, plan_flips={0: 1} if i and explained else {},
                      plan_unexplained={0: 1} if i and not explained else {},
                      plan_differences=(diff,) if i else ()) for i in range(2)]
    return VerifyReport(engine_dir="e", backend="ort-cpu", precision="fp32", batch=1, latent_hw=(16, 16),
                        schedule="every_step", tolerance=1e-4, rows=tuple(rows))


@pytest.mark.parametrize("explained", [True, False], ids=["near-tie", "wrong-plan"])
def test_verify_prints_plan_differences(explained, capsys, monkeypatch, tmp_path):
    import catome_export.runtime.verify as verify

    monkeypatch.setattr(verify, "verify_engine", lambda *a, **k: _report_with(explained))
    out_json = tmp_path / "r.json"
    assert main(["verify", "--engine", str(tmp_path), "--json", str(out_json)]) == (0 if explained else 1)
    out = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    if explained:
        assert "9*~1" in out and "near-tie: site 0, step 1, batch item 0, token 37" in out
        assert "verify OK" in out and "near-tie flips (1 tokens) at steps [1]" in out
        assert data["flip_steps"] == [1] and data["plan_failure_steps"] == []
    else:
        assert "9*?" in out and "NOT a near-tie: site 0, step 1, batch item 0, token 37" in out
        assert "verify FAILED" in out and "first at site 0, step 1, batch item 0, token 37" in out
        assert data["ok"] is False and data["plan_failure_steps"] == [1]


def test_verify_above_tolerance_exits_1(tiny_engine, capsys, monkeypatch):
    from catome_export.runtime.runtime import Runtime

    original = Runtime.step
    monkeypatch.setattr(Runtime, "step", lambda self, *a, **k: original(self, *a, **k) * 1.01 + 1e-3)
    assert main(["verify", "--engine", str(tiny_engine), *ARGS, "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "verify FAILED" in out and "above the limit" in out
    assert "max|diff|" not in out  # --quiet: no table


def test_verify_damaged_engine_exits_1_without_traceback(tiny_engine, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_engine, damaged)
    (damaged / "stage_5.onnx").write_bytes(b"truncated")
    proc = subprocess.run([sys.executable, "-m", "catome_export.cli", "verify", "--engine", str(damaged), *ARGS],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "catome-export build" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_verify_bad_arguments_exit_1(tmp_path, capsys):
    assert main(["verify", "--engine", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["verify", "--engine", str(tmp_path), "--resolution", "big"])
    assert info.value.code == 2


def test_verify_threads_zero_is_an_error(tiny_engine, capsys):
    """--threads 0 is refused with the valid range (it used to be dropped silently, running on every core)."""
    args = list(ARGS)
    args[args.index("--threads") + 1] = "0"
    assert main(["verify", "--engine", str(tiny_engine), *args, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--threads must be an int >= 1" in err and "got 0" in err


@pytest.mark.parametrize("load,busy", [(0.0, False), (1e4, True)], ids=["idle", "busy"])
def test_latency_line_says_what_it_compares_and_warns_when_busy(load, busy, tiny_engine, capsys, tmp_path,
                                                                 monkeypatch):
    import catome_export.runtime.verify as verify

    monkeypatch.setattr(verify, "load_average", lambda: load)
    report = tmp_path / "report.json"
    assert main(["verify", "--engine", str(tiny_engine), *ARGS, "--quiet", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("latency per step"))
    assert "vs eager CA-ToMe reference" in line and "no speedup over plain PyTorch" in line
    assert ("warning: the machine was busy while timing" in out) is busy
    timing = json.loads(report.read_text())["timing"]
    assert timing["busy"] is busy and timing["load_avg_max"] == load and timing["cpus"] >= 1
