"""``catome-export build``: end to end on the tiny model, atomic replacement, locks, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from catome_export.cli.rebuild import build_command
from catome_export.cli.main import main
from catome_export.engine.manifest import MANIFEST_FILE, Manifest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One ``catome-export build --model tiny --no-verify`` at 128 px into a temp folder: (folder, exit code, stdout)."""
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("engines") / "tiny"
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["build", "--model", "tiny", "--no-verify", "--resolution", "128", "--out", str(out)])
    return out, code, buf.getvalue()


def test_build_tiny_end_to_end(built):
    out, code, stdout = built
    assert code == 0
    manifest = Manifest.load(out)
    assert len(manifest.stages) == 6 and len(manifest.sites) == 5
    # the standard graphs (TensorRT builds from these) and, for ONNX Runtime, its fused form of each
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_FILE, "lora_map.json"] + [f"stage_{k}.onnx" for k in range(6)]
        + [f"stage_{k}.ort.onnx" for k in range(6)])
    assert [s.ort_optimized.file for s in manifest.stages if s.ort_optimized] == [f"stage_{k}.ort.onnx" for k in range(6)]
    assert manifest.shapes.latent_height == (16, 16) and manifest.shapes.batch == (1, 2)
    assert manifest.model.weights == "random" and manifest.extra["audit"]["passed"] is True
    assert build_command(manifest.rebuild_options()).startswith("catome-export build --model tiny --weights random")
    assert "TensorRT operator audit: pass" in stdout and "stage_2.onnx" in stdout
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder, no lock left


def test_interrupted_build_keeps_the_previous_one(built, monkeypatch, capsys):
    out, _, _ = built
    before = (out / MANIFEST_FILE).read_bytes()
    import catome_export.export.build as build_mod

    real = build_mod.export_stage
    calls = []

    def failing(spec, *args, **kwargs):
        calls.append(spec.index)
        if spec.index == 2:
            raise KeyboardInterrupt
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(build_mod, "export_stage", failing)
    code = main(["build", "--model", "tiny", "--no-verify", "--resolution", "128", "--out", str(out)])
    assert code == 130 and calls == [0, 1, 2]
    assert "interrupted" in capsys.readouterr().err
    assert (out / MANIFEST_FILE).read_bytes() == before
    Manifest.load(out)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_a_second_build_while_one_runs_is_refused(built, capsys):
    out, _, _ = built
    lock = out.parent / f".{out.name}.lock"
    lock.write_text(f"{os.getppid()}\n")  # a live process holds it
    try:
        code = main(["build", "--model", "tiny", "--no-verify", "--resolution", "128", "--out", str(out)])
    finally:
        lock.unlink()
    err = capsys.readouterr().err
    assert code == 1 and "another build" in err and str(os.getppid()) in err


def test_rebuild_over_the_users_files_is_refused_and_force_removes_them(built, capsys):
    out, _, _ = built
    notes = out / "my_notes.txt"
    notes.write_text("mine")
    # the rebuild is not what this tests: without ONNX Runtime's fusions it takes a third of the time
    argv = ["build", "--model", "tiny", "--no-verify", "--ort-optimize", "off", "--resolution", "128", "--out", str(out)]
    try:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and "my_notes.txt" in err and "--force" in err
        assert "Traceback" not in err and notes.read_text() == "mine"
        assert main([*argv, "--force"]) == 0
        assert not notes.exists()
        Manifest.load(out)
    finally:
        notes.unlink(missing_ok=True)


@pytest.mark.parametrize("argv,match", [
    (["--model", "nosuchmodel"], "unknown model"),
    (["--model", "tiny", "--min-resolution", "256", "--max-resolution", "128"], "larger than max resolution"),
    (["--model", "tiny", "--batch", "0"], "batch must be an int"),
    (["--model", "tiny", "--schedule", "fast"], "unknown schedule"),
])
def test_bad_input_exits_1(argv, match, capsys, tmp_path):
    code = main(["build", *argv, "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and match in err
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_resolution_not_multiple_of_8_exits_1_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "catome_export.cli", "build", "--model", "tiny", "--resolution",
                           "100", "--out", str(tmp_path / "e")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "not a multiple of 8" in proc.stderr and "Traceback" not in proc.stderr


def test_trt_backend_without_tensorrt_names_it(capsys, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the missing-TensorRT message cannot be seen")
    code = main(["build", "--model", "tiny", "--engine-kind", "trt", "--out", str(tmp_path / "e")])
    assert code == 1 and "TensorRT" in capsys.readouterr().err


def test_manifest_is_plain_json(built):
    out, _, _ = built
    data = json.loads((out / MANIFEST_FILE).read_text())
    assert data["stages"][0]["inputs"][0] == {"name": "sample", "dtype": "float32", "shape": ["B", 4, "H", "W"]}


def test_ctrl_c_while_the_commands_load_exits_130_without_traceback(monkeypatch, capsys):
    """Ctrl-C during the imports of the command modules (torch, diffusers: seconds on a cold start)."""
    import catome_export.cli.main as cli_main

    def interrupted(name, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main.importlib, "import_module", interrupted)
    assert cli_main.main(["build", "--model", "tiny"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted: nothing was started"


def test_r_multiple_reaches_the_build_settings_and_its_recorded_arguments(tmp_path):
    from catome_export.cli.cmd_build import options_from_args
    from catome_export.cli.main import build_parser

    def options(*extra: str):
        args = build_parser().parse_args(["build", "--model", "tiny", "--out", str(tmp_path / "e"), *extra])
        return options_from_args(args)

    rounded = options("--r-multiple", "64")
    assert rounded.settings.r_multiple == 64 and rounded.record().r_multiple == 64
    plain = options()
    assert plain.settings.r_multiple == 1 and plain.record().r_multiple is None
