"""The service on a real Ray Serve, isolated from the network (see conftest.py): scripts/serve_load.py and the CLI.

- ``test_service_end_to_end``: 2 replicas of the tiny engine; an image identical to a direct call at batch 1, bad
  requests answered 400 in OpenAI's error shape while the replica keeps serving, /-/healthz, a small load without
  errors (every third request a bad body, answered 4xx; the metrics count what the clients saw), the replica generating a seeded request's image killed (the request still answered, a replacement
  started while the other one keeps answering), the Prometheus metrics, and what listens where (loopback, but for
  the Serve replicas' gRPC servers).
- ``test_a_timed_mixed_load_then_a_queue_overflow`` (slow): the load for a while with bad bodies among the good
  requests, then the application redeployed with small limits and more clients than fit (200s and 429s).
- ``test_memory_is_flat_over_a_longer_load`` (slow): resident memory of a replica over 40 requests, with ONNX
  Runtime's CPU arena off (with it on, memory creeps up as the arena meets new merge counts; docs/serving.md).
- ``test_cli_serve_limits_drain_and_exposure`` (slow): ``catome-export serve --engine ENGINE`` with one replica taking one
  request and one waiting: the queue's limit (429), the request timeout (504), a client that goes away, SIGTERM's
  drain (exit 130, no Ray process left), and the ports the command names at start.
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
    from catome_export.serve.loadtest import is_loopback

    from catome_export.serve.loadtest import BAD_REQUESTS

    report = _load(tiny_engine, tmp_path, ray_env, ray_temp_dir, "--requests", "9", "--bad-every", "3",
                   "--concurrency", "3", "--replicas", "2", "--check-direct", "--bad-requests", "--kill-replica",
                   "--kill-requests", "4", "--node-address")
    assert report["checks"] and all(report["checks"].values()), report["checks"]  # the script exits 1 otherwise

    direct = report["direct"]
    assert direct["status"] == 200 and direct["batch_images"] == 1
    assert direct["identical"], direct
    assert direct["catome_fields"] == ["engine_sha256", "images"] and "replica_pid" not in report["engine_fields"]
    assert report["engine"]["engine_sha256"] == hashlib.sha256((tiny_engine / "manifest.json").read_bytes()).hexdigest()
    assert len(report["replica_pids_from_logs"]) == 2  # found in the replicas' Serve log files

    bad = report["bad_requests"]
    assert len(bad["cases"]) == len(BAD_REQUESTS)
    for case in bad["cases"]:
        assert case["status"] == 400 and case["type"] == "invalid_request_error", case
        assert case["message"] and "\n" not in case["message"]
    assert bad["good_request_after"] == 200 and bad["healthz"] == 200

    # the load: 6 good requests answered, every 3rd request a bad body answered 4xx, all in the API's shape; the
    # ingress's metrics counted what the clients saw
    load = report["load"]
    assert load["ok"] == 6 and load["errors"] == 0, load["first_errors"]
    assert 0 < load["p50_s"] <= load["p99_s"] <= load["max_s"]
    assert load["bad"]["sent"] == 3 and load["bad"]["all_4xx"] and load["not_api_shape"] == 0, load["bad"]
    assert load["metrics"]["consistent"] and load["metrics"]["client"] == {"images": 6, "invalid": 3, "ok": 6}, \
        load["metrics"]
    assert load["replica_states_after"] == {"RUNNING": 2} and load["healthz_after"] == 200

    kill = report["kill"]
    assert kill["replaced"], kill
    # the replica killed was generating the long request's image: the request, which names its seed, was sent
    # once more and answered; every request of the load was answered (JSON, never Serve's empty 500)
    long = kill["long_request"]
    assert long["victim_was_busy_s"] >= 0.05 and long["killed_after_s"] < long["seconds"], long
    assert long["status"] == 200 and long["images"] == 1, long
    assert kill["load"]["errors"] == 0, kill["load"]["first_errors"]
    # every answer JSON in the API's shape, never a plain-text 500; a request lost with the replica (one without
    # a seed) a 503 replica_lost with Retry-After
    assert kill["plain_text_500s"] == 0 and not kill["not_api_shape"] and not kill["other_non_200"], kill
    assert kill["new_replica_pids"] and kill["victim_pid"] not in kill["new_replica_pids"]
    assert kill["survivor_pids_still_answering"], kill
    assert report["replica_states_at_end"] == {"RUNNING": 2}

    # Prometheus metrics through Ray Serve's metrics API, scraped over loopback: requests by outcome (the ingress),
    # images, queue and generation time, steps, batch size, r per merge site, U-Net calls (the replicas)
    metrics = report["metrics"]
    assert metrics["url"].startswith("http://127.0.0.1:") and metrics["url"].endswith("/metrics"), metrics
    sums = metrics["sums"]
    assert sums["ray_catome_requests_total{outcome=ok}"] >= metrics["expected_ok"], sums
    assert sums["ray_catome_requests_total{outcome=invalid}"] >= len(BAD_REQUESTS) + 3, sums
    assert sums["ray_catome_resent_requests_total"] >= 1, sums  # the long request, after its replica was killed
    assert sums["ray_catome_images_total"] >= 1, sums
    for histogram in ("queue_seconds", "generation_seconds", "steps", "batch_images"):
        assert sums[f"ray_catome_{histogram}_count"] >= 1, (histogram, sums)
    assert sums["ray_catome_steps_sum"] >= 2 * sums["ray_catome_steps_count"], sums  # 2 steps or more per call
    sites = [k for k in sums if k.startswith("ray_catome_merged_tokens_count{site=")]
    assert sites and sums["ray_catome_unet_calls_total"] >= 2, sums

    # what listens where, in a namespace whose loopback also carries a network address as a machine's would:
    # Ray's own servers on loopback; beyond it only the Serve replicas' gRPC servers (Serve binds them to every
    # interface), which is what the command line reports
    listening = report["listening"]
    assert listening["127.0.0.1:8000"] == "ray::ProxyActor", listening
    beyond = {a: name for a, name in listening.items() if not is_loopback(a)}
    assert set(beyond.values()) == {"ray::ServeRepli"} and all(a.startswith("*:") for a in beyond), listening
    assert sorted(port for port in (a.rsplit(":", 1)[1] for a in beyond)) == \
        sorted(a.rsplit(":", 1)[1] for a, _ in report["exposed"]), report["exposed"]
    assert all(name.startswith("ray::ServeReplica:catome:") for _, name in report["exposed"]), report["exposed"]


@pytest.mark.slow
def test_memory_is_flat_over_a_longer_load(tiny_engine, tmp_path, ray_isolation, ray_env, ray_temp_dir):
    report = _load(tiny_engine, tmp_path, ray_env, ray_temp_dir, "--requests", "40", "--concurrency", "4",
                   "--replicas", "1", "--no-cpu-arena")
    assert report["load"]["errors"] == 0
    [replica] = report["memory"]["replicas"].values()
    assert report["memory"]["samples"] >= 5
    assert abs(replica["growth_pct"]) < 5.0, replica


@pytest.mark.slow
def test_a_timed_mixed_load_then_a_queue_overflow(tiny_engine, tmp_path, ray_isolation, ray_env, ray_temp_dir):
    """The load for a while, every other request a bad body; then the application redeployed with one request per
    replica and two queued, and four times as many clients as fit: 200s and 429s, each in the API's shape."""
    report = _load(tiny_engine, tmp_path, ray_env, ray_temp_dir, "--duration", "8", "--concurrency", "2",
                   "--bad-every", "2", "--replicas", "1", "--overflow", "--overflow-requests", "12")
    assert all(report["checks"].values()), report["checks"]
    load = report["load"]
    assert load["asked"] == {"requests": None, "duration_s": 8.0, "bad_every": 2}
    assert load["ok"] >= 1 and load["errors"] == 0 and load["bad"]["sent"] >= 1 and load["bad"]["all_4xx"], load
    assert load["limits"] == {"max_ongoing_requests": 2, "max_queued_requests": 32, "request_timeout_s": 300.0,
                              "replicas": 1, "capacity": 34}
    assert load["metrics"]["consistent"], load["metrics"]
    over = report["overflow"]
    assert over["limits"]["capacity"] == 3 and over["clients"] == 12 and over["requests"] == 12
    assert over["counts"]["200"] >= 1 and over["counts"]["429"] >= 1 and over["not_api_shape"] == 0, over
    assert sum(over["counts"].values()) == 12
    assert over["retry_after"].get("5", 0) == over["counts"]["429"] + over["counts"]["503"], over
    assert over["replica_states_after"] == {"RUNNING": 1}


@pytest.mark.slow
def test_cli_serve_limits_drain_and_exposure(tiny_engine, tmp_path, ray_isolation, ray_env):
    """``catome-export serve`` with one replica taking one request and one more waiting (cli_scenario.py): the
    queue's limit, the request timeout and a client that goes away, all answered in the API's JSON shape; SIGTERM
    drains; and, in a namespace whose loopback also carries a network address (as a machine's would), nothing
    listens beyond loopback."""
    from catome_export.serve.loadtest import is_loopback, isolated_command

    out = tmp_path / "cli.json"
    command = isolated_command([sys.executable, str(SCENARIO), str(tiny_engine), str(out)], node_address=True)
    proc = subprocess.run(command, env=ray_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["url_line"].startswith("serving ") and "http://127.0.0.1:8000/v1/images/generations" in \
        result["url_line"]
    assert result["status"] == 200 and result["images"] == 1 and result["png_size"] == [128, 128]

    # exposure: Ray's own servers listen on loopback, not on the namespace's network address; the only
    # exceptions are the Serve replicas' gRPC servers (Serve binds them to every interface), and the command
    # names each of them when it starts
    listening = result["listening"]
    assert listening["127.0.0.1:8000"] == "ray::ProxyActor", listening
    beyond = {a: name for a, name in listening.items() if not is_loopback(a)}
    assert beyond and set(beyond.values()) == {"ray::ServeRepli"}, listening
    assert all(a.startswith("*:") for a in beyond), beyond  # every interface, no address of the node's own
    [note] = result["note_lines"]
    assert note.startswith(f"note: {len(beyond)} port(s) of the local Ray listen beyond 127.0.0.1"), note
    for address in beyond:
        assert f"[::]:{address.rsplit(':', 1)[1]} (ray::ServeReplica:catome:" in note, (address, note)

    # backpressure: a full queue is 429 at once, with Retry-After, in the API's shape; the request that waited
    # is answered; the one whose client went away never ran
    full = result["queue_full"]
    assert full["status"] == 429 and full["error_code"] == "queue_full" and full["retry_after"] == "5", full
    assert full["error_keys"] == ["code", "message", "param", "type"] and full["seconds"] < 3, full
    assert result["queued_request"]["status"] == 200, result["queued_request"]
    assert result["ray_temp_found"] and result["disconnected_generations"] == 0

    # a request older than --request-timeout 8: 504 in the API's shape, its images not yet started dropped
    timeout = result["timeout"]
    assert timeout["status"] == 504 and timeout["error_code"] == "timeout" and timeout["json"], timeout
    assert 7.5 <= timeout["seconds"] < 12, timeout
    assert result["after_timeout"]["status"] == 200, result["after_timeout"]
    assert result["timed_out_generations"] < result["timed_out_images"], result

    # the outcomes counted in the metrics the command's URL exports
    assert result["metrics_line"].startswith("metrics: http://127.0.0.1:"), result["metrics_line"]
    outcomes = result["outcomes"]
    assert outcomes.get("queue_full", 0) >= 1 and outcomes.get("timeout", 0) >= 1, outcomes
    assert outcomes.get("disconnected", 0) >= 1 and outcomes.get("ok", 0) >= 4, outcomes

    # SIGTERM: new requests 503 (shutting_down, Retry-After), the one in flight that can finish within
    # --drain-timeout 4 does, the other is answered 503 at the drain timeout; then Ray stops
    assert result["drain_line"].startswith("stopping: new requests are answered 503; waiting up to 4 s for 2 "
                                           "request(s) in flight"), result["drain_line"]
    during = result["during_drain"]
    assert during["status"] == 503 and during["error_code"] == "shutting_down" and during["retry_after"] == "5"
    assert result["finished_in_drain"]["status"] == 200, result["finished_in_drain"]
    past = result["past_the_drain"]
    assert past["status"] == 503 and past["error_code"] == "shutting_down" and past["retry_after"] == "5", past
    assert 3.5 <= past["after_signal_s"] < 12, past
    assert result["rc"] == 130
    assert result["stderr_lines"][1:] == ["drain timeout: 1 request(s) still in flight were answered 503",
                                          "stopped: Serve and Ray were shut down"], result["stderr_tail"]
    assert result["last_stderr_line"] == "stopped: Serve and Ray were shut down"
    assert "Traceback" not in result["stderr_tail"]
    assert result["ray_processes_left"] == []
