"""The service on a real Ray Serve, isolated from the network (see conftest.py): scripts/serve_load.py and the CLI.

- ``test_service_end_to_end``: 2 replicas of the tiny engine; an image identical to a direct call at batch 1, bad
  requests answered 400 in OpenAI's error shape while the replica keeps serving, /-/healthz, a small load without
  errors, and a replica killed during load replaced while the other one keeps answering.
- ``test_memory_is_flat_over_a_longer_load`` (slow): resident memory of a replica over 40 requests, with ONNX
  Runtime's CPU arena off (with it on, memory creeps up as the arena meets new merge counts; docs/serving.md).
- ``test_cli_serve_answers_and_stops_on_ctrl_c`` (slow): ``catome-export serve ENGINE`` answers the request of the
  docs and stops on SIGINT with exit 130, one line and no Ray process left.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "serve_load.py"
SCENARIO = Path(__file__).resolve().parent / "cli_scenario.py"


def _load(engine, tmp_path, ray_env, ray_temp_dir, *extra: str, timeout: int = 900) -> dict:
    out = tmp_path / "report.json"
    command = [sys.executable, str(SCRIPT), "--engine", str(engine), "--steps", "2", "--threads", "1",
               "--ray-temp", ray_temp_dir, "--json", str(out), *extra]
    proc = subprocess.run(command, env=ray_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_service_end_to_end(tiny_engine, tmp_path, ray_isolation, ray_env, ray_temp_dir):
    report = _load(tiny_engine, tmp_path, ray_env, ray_temp_dir, "--requests", "6", "--concurrency", "3",
                   "--replicas", "2", "--check-direct", "--bad-requests", "--kill-replica", "--kill-requests", "4")

    direct = report["direct"]
    assert direct["status"] == 200 and direct["batch_images"] == 1
    assert direct["identical"], direct
    assert direct["catome_fields"] == ["engine_sha256", "images"] and "replica_pid" not in report["engine_fields"]
    assert report["engine"]["engine_sha256"] == hashlib.sha256((tiny_engine / "manifest.json").read_bytes()).hexdigest()
    assert len(report["replica_pids"]) == 2  # found in the replicas' Serve log files

    bad = report["bad_requests"]
    assert len(bad["cases"]) == 8
    for case in bad["cases"]:
        assert case["status"] == 400 and case["type"] == "invalid_request_error", case
        assert case["message"] and "\n" not in case["message"]
    assert bad["good_request_after"] == 200 and bad["healthz"] == 200

    load = report["load"]
    assert load["ok"] == 6 and load["errors"] == 0, load["first_errors"]
    assert 0 < load["p50_s"] <= load["p99_s"]

    kill = report["kill"]
    assert kill["replaced"], kill
    assert kill["new_replica_pids"] and kill["victim_pid"] not in kill["new_replica_pids"]
    assert kill["survivor_pids_still_answering"], kill
    assert report["replica_states_at_end"] == {"RUNNING": 2}


@pytest.mark.slow
def test_memory_is_flat_over_a_longer_load(tiny_engine, tmp_path, ray_isolation, ray_env, ray_temp_dir):
    report = _load(tiny_engine, tmp_path, ray_env, ray_temp_dir, "--requests", "40", "--concurrency", "4",
                   "--replicas", "1", "--no-cpu-arena")
    assert report["load"]["errors"] == 0
    [replica] = report["memory"]["replicas"].values()
    assert report["memory"]["samples"] >= 5
    assert abs(replica["growth_pct"]) < 5.0, replica


@pytest.mark.slow
def test_cli_serve_answers_and_stops_on_ctrl_c(tiny_engine, tmp_path, ray_isolation, ray_env):
    from catome_export.serve.loadtest import isolated_command

    out = tmp_path / "cli.json"
    command = isolated_command([sys.executable, str(SCENARIO), str(tiny_engine), str(out)])
    proc = subprocess.run(command, env=ray_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["url_line"].startswith("serving ") and "http://127.0.0.1:8000/v1/images/generations" in \
        result["url_line"]
    assert result["status"] == 200 and result["images"] == 1 and result["png_size"] == [128, 128]
    assert result["rc"] == 130
    assert result["last_stderr_line"] == "stopped: Serve and Ray were shut down"
    assert "Traceback" not in result["stderr_tail"]
    assert result["ray_processes_left"] == []
