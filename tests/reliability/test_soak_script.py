"""scripts/soak.py runs end to end on a short schedule and writes its JSON (the memory figure is not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_soak_script_short_run(reliability_engine, child_env, tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(REPO / "scripts" / "soak.py"), "--engine", str(reliability_engine), "--steps", "30",
           "--change-every", "10", "--checkpoint-every", "5", "--resolutions", "128,192", "--warmup-steps", "2",
           "--max-growth", "1000", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env(), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and f"wrote {out}" in proc.stdout
    data = json.loads(out.read_text())
    assert data["steps"] == 30 and data["generations"] == 3 and data["resolutions"] == [128, 192]
    assert data["checkpoint_steps"] == 6  # loop indices 0 and 5 of each 10-step generation
    assert data["nonfinite_steps"] == 0 and data["passed"] is True and data["backend"] == "ort-cpu"
    assert {k: v["steps"] for k, v in data["per_resolution"].items()} == {"128": 20, "192": 10}
    assert all(v["mean_merged_tokens"] > 0 for v in data["per_resolution"].values())  # smooth latents merge
    rss = data["rss_mib"]
    assert [s["step"] for s in rss["samples"]] == [0, 10, 20, 30]
    assert all(isinstance(rss[k], float) and rss[k] > 0 for k in ("start", "end"))
    assert abs(data["growth_pct"] - (rss["end"] - rss["start"]) / rss["start"] * 100) < 0.01
    assert set(data["step_ms"]) == {"median", "p95", "max"} and data["seconds"] > 0


def test_soak_script_refuses_bad_arguments(child_env):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "soak.py"), "--resolutions", "100"],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 2 and "multiples of 8" in proc.stderr and "Traceback" not in proc.stderr
