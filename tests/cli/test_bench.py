"""``catome-export bench`` end to end on tiny (1 repeat, 128 px): JSON schema and plot, not speed."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from catome_export.cli.main import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_tiny_end_to_end(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the engine backend runs in ONNX Runtime here")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["bench", "--model", "tiny", "--resolution", "128", "--batch", "1", "--repeats", "1",
                 "--checkpoint-repeats", "1", "--threads", "1", "--backends",
                 "eager,eager-catome,engine,engine-unfused",
                 "--merge-fractions", "0,0.5", "--workdir", str(tmp_path / "work"),
                 "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "| backend | resolution |" in stdout and "| engine | 128 | 1 | 0.50 |" in stdout

    data = json.loads(out_json.read_text())
    for key in ("cpu", "physical_cores", "threads", "torch", "onnxruntime", "load_average_1min_before",
                "load_average_1min_after", "shared_machine"):
        assert key in data["device"]
    assert data["device"]["threads"] == 1 and data["device"]["gpu"] is None
    rows = data["rows"]
    assert [(r["backend"], r["merge_fraction"]) for r in rows] == [
        ("eager", 0.0), ("eager-catome", 0.0), ("eager-catome", 0.5), ("engine", 0.0), ("engine", 0.5),
        ("engine-unfused", 0.0), ("engine-unfused", 0.5)]
    runs_on = {r["backend"]: r["runs_on"] for r in rows}
    assert runs_on["engine"] == "ort-cpu, ORT-fused graphs" and runs_on["engine-unfused"] == "ort-cpu, standard graphs"
    assert data["config"]["ort_optimize"] is True
    for r in rows:
        assert r["resolution"] == 128 and r["batch"] == 1 and r["latent"] == [16, 16]
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert len(r["samples_ms"]) == r["repeats"] and min(r["samples_ms"]) == pytest.approx(r["min_ms"], abs=1e-3)
        assert r["ideal_speedup"] >= 1.0 and r["speedup_vs_eager"] > 0 and r["speedup_vs_engine0"] > 0
    engine = {r["merge_fraction"]: r for r in rows if r["backend"] == "engine"}
    unfused = {r["merge_fraction"]: r for r in rows if r["backend"] == "engine-unfused"}
    assert unfused[0.5]["merged"] == engine[0.5]["merged"] and unfused[0.5]["speedup_vs_engine0"] > 0
    assert engine[0.5]["merged"] == {str(i): 96 for i in range(5)}
    assert engine[0.0]["merged"] == {str(i): 0 for i in range(5)}
    assert engine[0.5]["ideal_speedup"] > engine[0.0]["ideal_speedup"] == 1.0
    assert len(engine[0.5]["stage_ms"]) == 6 and engine[0.5]["checkpoint_repeats"] == 1
    ctrl = engine[0.5]["controller"]
    assert 0 <= ctrl["cached_share"] < 1 and 0 < ctrl["checkpoint_share"] < 1
    assert rows[0]["controller"]["cached_ms"] is None  # plain eager has no controller

    blob = out_png.read_bytes()
    assert blob.startswith(PNG_SIGNATURE) and len(blob) > 5000


@pytest.mark.parametrize("argv,match", [
    (["--backends", "eager,warp"], "unknown backends"),
    (["--resolution", "100"], "multiple of 8"),
    (["--merge-fractions", "0,x"], "comma-separated list of floats"),
    (["--json", "out.txt"], "must end in .json"),
    (["--precision", "fp16"], "CUDA device"),
    (["--engine", "/nonexistent/engine"], "is not a folder"),
    (["--backends", "engine-unstaged", "--resolution", "136"], "divisible by 64"),
    (["--ort-option", "shared_arena=yes"], "ORT option shared_arena must be true or false"),
    (["--ort-option", "fused_graphs=false"], "with --ort-optimize on|off"),
])
def test_bench_bad_input_is_exit_1_without_traceback(argv, match, capsys):
    assert main(["bench", "--model", "tiny", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert match in err


def test_bench_refuses_an_engine_without_fused_graphs_when_asked_for_them(tmp_path, capsys, built_engine):
    """--ort-optimize on (the default) on a folder built with --ort-optimize off: exit 1, told what to do."""
    pytest.importorskip("onnxruntime", reason="the engine backend runs in ONNX Runtime here")
    from catome_export.export.manifest import Manifest

    folder = tmp_path / "plain"
    shutil.copytree(built_engine, folder)
    manifest = Manifest.load(folder)
    for stage in manifest.stages:
        (folder / stage.ort_optimized.file).unlink()
    manifest.stages = tuple(replace(stage, ort_optimized=None) for stage in manifest.stages)
    manifest.save(folder)
    argv = ["bench", "--engine", str(folder), "--backends", "engine", "--resolution", "128", "--batch", "1",
            "--repeats", "1", "--threads", "1", "--merge-fractions", "0"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "has no ONNX Runtime fused graphs" in err and "--ort-optimize off" in err
    assert main([*argv, "--ort-optimize", "off"]) == 0
    assert "| engine | 128 | 1 | 0.00 |" in capsys.readouterr().out
