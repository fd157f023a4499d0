"""scripts/gpu_check.{sh,py}: arguments, the no-CUDA exit, and the JSON (the tiny model on the CPU).

The GPU figures themselves come only from a run on a GPU machine; here the
same code runs on the CPU with the tiny model (hidden ``--device cpu --model
tiny``), and what is checked is the structure and the arithmetic of the
JSON, never a timing.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# -- arguments ------------------------------------------------------------------------------------------------------
def test_defaults(gpu_check):
    args = gpu_check.parse_args([])
    assert args.out == Path("benchmarks/results/gpu_check.json")
    assert args.resolutions == [512, 1024] and args.device == "cuda" and args.model == "sd15"
    assert args.steps >= 2 and args.budget_s > 0 and args.pytest_rc is None


@pytest.mark.parametrize("argv, message", [
    (["--resolutions", "500"], "multiples of 8"),
    (["--resolutions", "a,b"], "integers"),
    (["--resolutions", ""], "multiples of 8"),
    (["--steps", "1"], "at least 2"),
    (["--budget-s", "0"], "positive"),
    (["--model", "sdxl"], "invalid choice"),
])
def test_bad_arguments_exit_2(gpu_check, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        gpu_check.parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_test_only_options_stay_out_of_the_help(gpu_check, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--resolutions" in text and "--device" not in text and "--model" not in text


# -- no CUDA --------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: the no-CUDA exit cannot happen")
def test_python_part_without_cuda_exits_2_and_writes_nothing(gpu_check, tmp_path, capsys):
    out = tmp_path / "results" / "gpu.json"
    assert gpu_check.main([str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists() and not out.parent.exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: the no-CUDA exit cannot happen")
def test_shell_script_without_cuda_exits_2_before_installing(tmp_path):
    out = tmp_path / "gpu.json"
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin:" + str(Path(sys.executable).parent),
                                            "PYTHON": sys.executable, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr and "Nothing was written" in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no log folder, no install attempted
    assert "install" not in proc.stdout and time.perf_counter() - t0 < 60


# -- pieces ---------------------------------------------------------------------------------------------------------
def test_summary_medians(gpu_check):
    calls = [{"ms": 5.0, "matched": True}, {"ms": 1.0, "matched": False}, {"ms": 3.0, "matched": False},
             {"ms": 2.0, "matched": False}]
    s = gpu_check.summarise(calls)
    assert s == {"calls": 4, "median_ms": 2.5, "min_ms": 1.0, "mean_ms": 2.75, "median_matched_ms": 5.0,
                 "median_cached_ms": 2.0}
    plain = gpu_check.summarise([{"ms": 4.0}, {"ms": 6.0}])
    assert plain == {"calls": 2, "median_ms": 5.0, "min_ms": 4.0, "mean_ms": 5.0}
    cached = gpu_check.summarise([{"ms": 9.0, "cached_features": False}, {"ms": 1.0, "cached_features": True},
                                  {"ms": 2.0, "cached_features": True}])
    assert cached == {"calls": 3, "median_ms": 2.0, "min_ms": 1.0, "mean_ms": 4.0, "median_full_ms": 9.0,
                      "median_feature_cached_ms": 1.5}


def test_timed_generation_stops_at_the_deadline_after_one_call(gpu_check):
    seen = []
    records, truncated = gpu_check.timed_generation(lambda i: seen.append(i) or {"i": i}, 5,
                                                    gpu_check.Deadline.after(-1.0), "cpu")
    assert truncated and seen == [0] and records[0]["i"] == 0 and records[0]["ms"] >= 0
    records, truncated = gpu_check.timed_generation(lambda i: {}, 3, gpu_check.Deadline.after(60.0), "cpu")
    assert not truncated and [r["index"] for r in records] == [0, 1, 2]


def test_a_failing_part_is_recorded_and_the_next_still_runs(gpu_check, tmp_path):
    report = gpu_check.Report(tmp_path / "r.json", {"parts": {}})

    def broken() -> dict:
        raise RuntimeError("out of memory, say")

    gpu_check.run_part(report, "first", broken)
    gpu_check.run_part(report, "second", lambda: {"calls": [], "summary": {}})
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["parts"]["first"]["status"] == "failed"
    assert data["parts"]["first"]["error"] == "RuntimeError: out of memory, say"
    assert "broken" in data["parts"]["first"]["traceback"]
    assert data["parts"]["second"]["status"] == "ok" and data["parts"]["second"]["wall_s"] >= 0


# -- the whole JSON, tiny model on the CPU --------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_cpu_run_writes_one_complete_json(gpu_check, tmp_path):
    out = tmp_path / "nested" / "gpu_check.json"
    log = tmp_path / "pytest.log"
    log.write_text("collected 9 items\n9 skipped in 1.0s\n")
    rc = gpu_check.main([str(out), "--device", "cpu", "--model", "tiny", "--resolutions", "64", "--steps", "3",
                         "--warmup", "0", "--budget-s", "900", "--pytest-log", str(log), "--pytest-rc", "0"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == ["gpu_check.json"]  # no temporary file left behind
    assert data["status"] == "ok" and data["config"]["model"] == "tiny" and data["config"]["resolutions"] == [64]
    assert data["device"]["torch"] == torch.__version__ and data["device"]["device"] == "cpu"
    assert data["pytest_gpu"] == {"rc": 0, "log_tail": "collected 9 items\n9 skipped in 1.0s\n"}
    assert data["install"] == {"rc": None, "log_tail": None}
    assert len(data["config"]["merge_sites"]) == 5

    parts = data["parts"]
    generation = {"generation/64/eager/plain", "generation/64/eager/deepcache",
                  "generation/64/chain/nothing-merged/no-cache", "generation/64/chain/nothing-merged/cache",
                  "generation/64/chain/catome-forced/no-cache", "generation/64/chain/catome-forced/cache"}
    assert set(parts) == {"eager/64/plain", "eager/64/catome-forced", "eager/64/catome-t0.7-smooth",
                          "chain/64/catome-forced/no-graphs", "chain/64/catome-forced/cuda-graphs",
                          "chain/64/nothing-merged/no-graphs", "chain/64/nothing-merged/cuda-graphs", *generation,
                          "tensorrt/tiny"}
    assert parts.pop("tensorrt/tiny")["status"] == "skipped"
    for name in generation:  # 3 DDIM calls with interval 3: full, cached, cached
        kinds = [c.get("cached_features", False) for c in parts[name]["calls"]]
        assert kinds == ([False, True, True] if name.endswith(("deepcache", "/cache")) else [False] * 3), name
    for name, part in parts.items():
        if name.endswith("cuda-graphs"):
            assert part["status"] == "skipped" and "CUDA" in part["reason"]
            continue
        assert part["status"] == "ok" and not part["truncated"], name
        ms = [c["ms"] for c in part["calls"]]
        assert len(ms) == 3 and all(m > 0 for m in ms)
        assert part["summary"]["median_ms"] == round(statistics.median(ms), 3)
    forced = parts["eager/64/catome-forced"]["calls"]
    assert forced[0]["matched"] and all(r > 0 for c in forced for r in c["merged"].values())
    assert [c["merged"] for c in forced][1:] == [forced[0]["merged"]] * 2  # cached steps reuse the first plan
    chain_forced = parts["chain/64/catome-forced/no-graphs"]["calls"]
    assert [c["merged"] for c in chain_forced] == [c["merged"] for c in forced]  # same forced counts
    nothing = parts["chain/64/nothing-merged/no-graphs"]["calls"]
    assert all(r == 0 for c in nothing for r in c["merged"].values())
    assert "matched" not in parts["eager/64/plain"]["calls"][0]


# -- the TensorRT part ----------------------------------------------------------------------------------------------
def test_tensorrt_part_names_what_is_missing(gpu_check, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else real(name, *a))
    why = gpu_check.tensorrt_missing()
    assert why is not None and why.startswith("tensorrt not importable") and "GPU_CHECK_WHEELS" in why
    part = gpu_check.tensorrt_part("cuda", 3, gpu_check.Deadline.after(60))
    assert part == {"status": "skipped", "reason": why}


def test_tensorrt_part_needs_cuda_even_with_the_packages(gpu_check, monkeypatch):
    monkeypatch.setattr(gpu_check, "tensorrt_missing", lambda: None)
    part = gpu_check.tensorrt_part("cpu", 3, gpu_check.Deadline.after(60))
    assert part["status"] == "skipped" and "CUDA" in part["reason"]
