"""``catome-export bench`` end to end on tiny (1 repeat, 128 px): JSON schema and plot, not speed."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from catome_export.cli.main import main
from catome_export.errors import CatomeError

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
    from catome_export.engine.manifest import Manifest

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


XL_SIZE = 128
"""tiny-xl at 128 px: a 16x16 latent, its ten merge sites on the 8x8 grid of downsample 2."""


@pytest.fixture(scope="module")
def xl_bench(tmp_path_factory):
    """``catome-export bench --model tiny-xl`` with the default backends (eager, eager-catome, engine)."""
    pytest.importorskip("onnxruntime", reason="the engine backend runs in ONNX Runtime here")
    root = tmp_path_factory.mktemp("xl-bench")
    out_json = root / "r.json"
    code = main(["bench", "--model", "tiny-xl", "--resolution", str(XL_SIZE), "--repeats", "1",
                 "--checkpoint-repeats", "1", "--threads", "1", "--merge-fractions", "0,0.5",
                 "--workdir", str(root / "work"), "--json", str(out_json)])
    assert code == 0
    return json.loads(out_json.read_text()), root / "work"


def test_bench_tiny_xl_end_to_end(xl_bench):
    """SDXL-style model: every default backend times rows; merging happens at the model's merge level (2)."""
    data, _ = xl_bench
    rows = data["rows"]
    assert data["config"]["backends"] == ["eager", "eager-catome", "engine"]
    assert [(r["backend"], r["merge_fraction"]) for r in rows] == [
        ("eager", 0.0), ("eager-catome", 0.0), ("eager-catome", 0.5), ("engine", 0.0), ("engine", 0.5)]
    for r in rows:
        assert r["resolution"] == XL_SIZE and r["batch"] == 2 and r["latent"] == [16, 16]
        assert 0 < r["min_ms"] <= r["median_ms"]
    # ten sites (depth 2 in down_blocks.1 and up_blocks.1, ... at downsample 2), 8x8 grid: 48 src, round(0.5 * 48)
    for backend in ("engine", "eager-catome"):
        by_fraction = {r["merge_fraction"]: r for r in rows if r["backend"] == backend}
        assert by_fraction[0.5]["merged"] == {str(i): 24 for i in range(10)}
        assert by_fraction[0.0]["merged"] == {str(i): 0 for i in range(10)}
        assert by_fraction[0.5]["ideal_speedup"] > by_fraction[0.0]["ideal_speedup"] == 1.0
    engine = {r["merge_fraction"]: r for r in rows if r["backend"] == "engine"}
    assert len(engine[0.5]["stage_ms"]) == 11 and engine[0.5]["checkpoint_repeats"] == 1
    assert not [n for n in data["notes"] if "other merge options" in n]


def test_bench_tiny_xl_engine_and_unstaged_match_eager_at_fraction_0(xl_bench):
    """The inputs a row times, added conditioning included, reach every target alike: at merge fraction 0 the
    engine and the unstaged graph give the eager U-Net's output."""
    from catome_export.bench.config import BenchConfig
    from catome_export.bench.measure import BENCH_SCHEDULE
    from catome_export.bench.rows import make_inputs
    from catome_export.bench.targets import EagerTarget, EngineTarget, UnstagedTarget
    from catome_export.bench.unstaged import export_unstaged, load_unstaged
    from catome_export.merging import MergeSettings
    from catome_export.models import load_unet

    _, workdir = xl_bench
    config = BenchConfig(model="tiny-xl", workdir=workdir)
    unet = load_unet("tiny-xl", "random")
    inputs = make_inputs(unet.config, XL_SIZE, config)
    assert inputs.added is not None
    assert inputs.added["text_embeds"].shape == (2, 32)
    assert inputs.added["time_ids"].tolist() == [[XL_SIZE, XL_SIZE, 0, 0, XL_SIZE, XL_SIZE]] * 2
    want = EagerTarget(unet)(inputs.sample, inputs.timestep, inputs.text, inputs.added)
    engine = EngineTarget.load(workdir / "tiny-xl-random-fp32" / "engine", "ort", "cpu", {"intra_op_threads": 1})
    graph = export_unstaged(unet, workdir / "unstaged-check")
    runner, backend = load_unstaged(graph, unet.config, "float32", "cpu", {"intra_op_threads": 1})
    try:
        engine.configure(MergeSettings(threshold=None, merge_fraction=0.0, schedule=BENCH_SCHEDULE, max_downsample=2))
        engine.new_generation()
        got = engine(inputs.sample, inputs.timestep, inputs.text, inputs.added)
        unstaged = UnstagedTarget(runner, backend)(inputs.sample, inputs.timestep, inputs.text, inputs.added)
    finally:
        engine.close()
        backend.close()
    assert float((got - want).abs().max()) < 1e-4
    assert float((unstaged - want).abs().max()) < 1e-4
    assert float(want.abs().max()) > 1e-2
    other = EagerTarget(unet)(inputs.sample, inputs.timestep, inputs.text,
                              {**inputs.added, "time_ids": inputs.added["time_ids"] * 2})
    assert float((other - want).abs().max()) > 1e-3  # the conditioning the rows carry changes the output


def test_bench_tiny_xl_sequential_with_engine_unstaged_and_profiles(xl_bench, tmp_path):
    """engine-unstaged on an SDXL-style model (its graph takes text_embeds and time_ids), the eager patch at the
    model's merge level in a sequential run (its rows run before any engine is loaded), and the profiles."""
    from catome_export.bench.config import BenchConfig
    from catome_export.bench.runner import run_bench

    _, workdir = xl_bench
    config = BenchConfig(model="tiny-xl", backends=("eager", "eager-catome", "engine", "engine-unstaged"),
                         resolutions=(XL_SIZE,), merge_fractions=(0.5,), repeats=1, checkpoint_repeats=1, threads=1,
                         workdir=workdir, interleave=False, profile_dir=tmp_path / "profile")
    result = run_bench(config, progress=lambda line: None)
    rows = result.rows
    assert [r["backend"] for r in rows] == ["eager", "eager-catome", "engine", "engine-unstaged"]
    assert rows[1]["merged"] == rows[2]["merged"] == {str(i): 24 for i in range(10)}
    assert rows[3]["runs_on"] == "ort-cpu, ORT-fused graphs" and rows[3]["median_ms"] > 0
    assert (workdir / "tiny-xl-random-fp32" / "unstaged" / "unet.onnx").is_file()
    profile = result.profile
    assert profile is not None and profile["eager"]["run_ms"] > 0 and profile["unstaged"]["run_ms"] > 0
    assert len(profile["engine"]["0.5"]["stages"]) == 11


def test_bench_one_at_a_time_interleaves_each_backends_rows_alone(xl_bench, monkeypatch):
    """--one-at-a-time: each backend is loaded after the previous one is closed, and its own rows (merge fractions)
    are timed in one set of rotated rounds."""
    from catome_export.bench import runner
    from catome_export.bench.config import BenchConfig

    _, workdir = xl_bench
    rounds: list[tuple[int, int]] = []  # per measure_interleaved call: (distinct targets, rows)
    real_interleaved = runner.measure_interleaved

    def spy(jobs, inputs, **kwargs):
        targets = {id(j.target) for j in jobs}
        rounds.append((len(targets), len(jobs)))
        return real_interleaved(jobs, inputs, **kwargs)

    def no_sequential(*args, **kwargs):
        raise AssertionError("rows timed one after the other")

    monkeypatch.setattr(runner, "measure_interleaved", spy)
    monkeypatch.setattr(runner, "measure", no_sequential)
    engine = workdir / "tiny-xl-random-fp32" / "engine"  # given as --engine: its weights are compared with eager's
    assert (engine / "manifest.json").is_file()
    config = BenchConfig(model="tiny-xl", backends=("eager", "eager-catome", "engine"), resolutions=(XL_SIZE,),
                         merge_fractions=(0.0, 0.5), repeats=1, threads=1, workdir=workdir, one_at_a_time=True,
                         engine_dir=engine)
    result = runner.run_bench(config, progress=lambda line: None)
    assert not [n for n in result.notes if "other weights" in n], result.notes
    session = runner._Session(config, lambda line: None)
    runner._compare_weights(session, engine, "0" * 64)  # an engine of other weights is said, not refused
    assert any("was built from other weights (tiny-xl, random)" in n for n in session.notes), session.notes
    assert rounds == [(1, 1), (1, 2), (1, 2)]  # eager: one row; eager-catome and engine: two rows each
    assert [(r["backend"], r["merge_fraction"]) for r in result.rows] == [
        ("eager", 0.0), ("eager-catome", 0.0), ("eager-catome", 0.5), ("engine", 0.0), ("engine", 0.5)]
    assert result.rows[-1]["merged"] == {str(i): 24 for i in range(10)} and result.config["one_at_a_time"]
    with pytest.raises(CatomeError, match="choose one"):
        BenchConfig(model="tiny-xl", interleave=False, one_at_a_time=True)


def test_bench_tiny_xl_engine_folder_alone(xl_bench, tmp_path):
    """--engine on an SDXL-style engine, no torch model loaded: the model, its conditioning and its merge level
    come from the manifest (no note about other merge options)."""
    _, workdir = xl_bench
    out_json = tmp_path / "r.json"
    code = main(["bench", "--engine", str(workdir / "tiny-xl-random-fp32" / "engine"), "--backends", "engine",
                 "--resolution", str(XL_SIZE), "--repeats", "1", "--threads", "1", "--merge-fractions", "0.5",
                 "--json", str(out_json)])
    assert code == 0
    data = json.loads(out_json.read_text())
    assert data["config"]["model"] == "tiny-xl"
    assert [r["merged"] for r in data["rows"]] == [{str(i): 24 for i in range(10)}]
    assert data["rows"][0]["ideal_speedup"] > 1.0
    assert not [n for n in data["notes"] if "other merge options" in n]


def test_bench_r_multiple_rounds_the_forced_fractions(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code = main(["bench", "--model", "tiny", "--resolution", "128", "--batch", "1", "--repeats", "1",
                 "--threads", "1", "--backends", "eager-catome", "--merge-fractions", "0.5", "--r-multiple", "40",
                 "--workdir", str(tmp_path / "work"), "--json", str(out_json)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out_json.read_text())
    assert data["config"]["r_multiple"] == 40
    (row,) = data["rows"]
    assert row["merged"] == {str(i): 80 for i in range(5)}  # round(0.5 * 192) = 96 -> 80
    assert row["merge_fraction"] == round(80 / 192, 4) and row["requested_merge_fraction"] == 0.5
