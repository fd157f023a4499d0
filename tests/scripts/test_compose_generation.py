"""scripts/compose_generation.py: an N-step mean composed from per-call medians, checked against a measured run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "compose_generation.py"
MEASURED = REPO / "benchmarks" / "results" / "sd15_cpu_512_b2_generation.json"


def _module():
    spec = importlib.util.spec_from_file_location("compose_generation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_composed_50_step_means_match_a_measured_50_step_run():
    run = json.loads(MEASURED.read_text())
    assert run["config"]["steps"] == 50
    rows = _module().compose(run, 50)
    assert len(rows) == len(run["rows"]) == 6
    for row in rows:
        # the composition uses medians, the measured mean every call: within 2 % on this run
        assert row["composed_mean_ms_per_step"] == pytest.approx(row["measured_mean_ms_per_step"], rel=0.02)
        assert row["cached_calls"] == (33 if row["feature_cache"] else 0)


def test_the_schedule_counts_follow_the_interval():
    run = {"mode": "generation", "rows": [
        {"label": "eager", "backend": "eager", "merge_fraction": None, "feature_cache": None, "full_call_ms": 100.0,
         "cached_call_ms": None, "mean_ms_per_step": 100.0, "calls": 3},
        {"label": "engine @ 0 + cache 3,0", "backend": "engine", "merge_fraction": 0.0,
         "feature_cache": {"interval": 3, "branch": 0}, "full_call_ms": 90.0, "cached_call_ms": 10.0,
         "mean_ms_per_step": 36.7, "calls": 3}]}
    eager, cached = _module().compose(run, 50)
    assert (cached["full_calls"], cached["cached_calls"]) == (17, 33)
    assert cached["composed_mean_ms_per_step"] == pytest.approx((17 * 90 + 33 * 10) / 50)
    assert cached["vs_eager"] == pytest.approx(100 / ((17 * 90 + 33 * 10) / 50))
    assert eager["vs_no_cache"] is None


def test_a_file_that_is_no_generation_run_is_refused(tmp_path):
    bad = tmp_path / "calls.json"
    bad.write_text(json.dumps({"rows": []}))
    out = subprocess.run([sys.executable, str(SCRIPT), str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and "not a generation-mode result" in out.stderr and "Traceback" not in out.stderr
