"""``catome-export generate`` on the offline tiny pipeline: eager CA-ToMe, an engine runtime, bad inputs."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from catome_export.cli.main import main
from catome_export.engine.manifest import ModelRecord

SMALL = ["--steps", "2", "--resolution", "64"]
STEP_LINE = re.compile(r"^step +(\d+)  merged (\[[\d, ]+\]|-)  (matched \[[\d, ]*\]  )?[\d.]+ ms$")


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """The offline tiny pipeline saved as a local diffusers folder (what save_pretrained writes)."""
    from catome_export.models.pipeline import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-pipeline")
    tiny_pipeline().save_pretrained(folder)
    return folder


def _step_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("step ")]


def _check_png(path, size=(64, 64)) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size and im.mode == "RGB"
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.mark.slow
def test_generate_tiny_writes_a_png_and_prints_merged_counts(tmp_path, capsys):
    out = tmp_path / "sub" / "car.png"
    rc = main(["generate", "--model", "tiny", "--prompt", "a red car", "--seed", "3", *SMALL, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    _check_png(out)
    lines = _step_lines(captured.out)
    assert len(lines) >= 2
    for i, line in enumerate(lines):
        m = STEP_LINE.match(line)
        assert m, line
        assert int(m.group(1)) == i
        assert m.group(2).count(",") == 4  # five merge sites in the SD 1.5 layout
    assert "matched [0, 1, 2, 3, 4]" in lines[0]  # step 0 matches at every site (empty caches)
    assert f"wrote {out}" in captured.out and "CA-ToMe t=0.7" in captured.out


def test_generate_with_an_engine_runtime(tmp_path, capsys, monkeypatch, tiny_engine_runtime):
    from catome_export.runtime import Runtime

    loaded = []

    def fake_load(engine_dir, backend="auto", device=None, **kwargs):
        runtime = tiny_engine_runtime()
        loaded.append(runtime)
        return runtime

    monkeypatch.setattr(Runtime, "load", staticmethod(fake_load))
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    out = tmp_path / "engine.png"
    rc = main(["generate", "--engine", str(engine_dir), "--prompt", "a red car", "--steps", "2", "--threshold",
               "0.5", "--schedule", "every_step", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    _check_png(out)  # the engine's optimal profile (latent 8x8) sets the default size
    lines = _step_lines(captured.out)
    assert len(lines) >= 2 and all(STEP_LINE.match(line) for line in lines)
    assert all("matched [0, 1, 2, 3, 4]" in line for line in lines)  # every_step overrides config3
    assert "t=0.5" in captured.out and "engine on torch" in captured.out
    assert loaded and loaded[0]._closed  # the command closes the runtime


def test_generate_with_a_built_engine_folder(built_engine, tmp_path, capsys):
    out = tmp_path / "engine.png"
    rc = main(["generate", "--engine", str(built_engine), "--backend", "ort", "--prompt", "a red car", "--steps", "2",
               "--resolution", "128", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    _check_png(out, (128, 128))
    lines = _step_lines(captured.out)
    assert len(lines) >= 2 and all(STEP_LINE.match(line) for line in lines)
    assert "engine on ort-cpu" in captured.out


def test_generate_outside_the_engines_range_exits_1(built_engine, tmp_path, capsys):
    rc = main(["generate", "--engine", str(built_engine), "--backend", "ort", "--prompt", "a red car", "--steps", "2",
               "--resolution", "64", "--out", str(tmp_path / "x.png")])
    captured = capsys.readouterr()
    assert rc == 1 and captured.err.startswith("error: ") and "Traceback" not in captured.err
    assert "catome-export build" in captured.err  # names the rebuild command
    assert not (tmp_path / "x.png").exists()


def test_generate_from_a_local_pipeline_folder(pipeline_folder, tmp_path, capsys):
    out = tmp_path / "folder.png"
    rc = main(["generate", "--model", str(pipeline_folder), "--prompt", "a red car", *SMALL, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    _check_png(out)
    assert len(_step_lines(captured.out)) >= 2


def test_an_engine_of_a_folder_model_loads_the_pipeline_without_its_unet(pipeline_folder, tiny_engine_runtime,
                                                                         tmp_path, capsys, monkeypatch):
    from catome_export.runtime import Runtime

    seen = []

    def fake_load(engine_dir, backend="auto", device=None, **kwargs):
        runtime = tiny_engine_runtime()
        runtime.manifest.model = ModelRecord(id=str(pipeline_folder), weights="pretrained")
        seen.append(runtime)
        return runtime

    monkeypatch.setattr(Runtime, "load", staticmethod(fake_load))
    import catome_export.runtime.embed as embed

    originals = []
    real_attach = embed.attach

    def spy_attach(pipe, runtime):
        originals.append(pipe.unet)
        return real_attach(pipe, runtime)

    monkeypatch.setattr(embed, "attach", spy_attach)
    (tmp_path / "engine").mkdir()
    rc = main(["generate", "--engine", str(tmp_path / "engine"), "--prompt", "a red car", "--steps", "2",
               "--out", str(tmp_path / "e.png")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert originals == [None]  # the eager U-Net was never loaded: the engine took its place
    _check_png(tmp_path / "e.png")


def test_hub_model_unavailable_offline_names_the_tiny_option(tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", staticmethod(offline))
    rc = main(["generate", "--model", "sd15", "--prompt", "a red car", *SMALL, "--out", str(tmp_path / "x.png")])
    captured = capsys.readouterr()
    assert rc == 1 and captured.err.startswith("error: ") and "Traceback" not in captured.err
    assert "--model tiny" in captured.err and "stable-diffusion-v1-5" in captured.err


def test_generate_without_merging_prints_no_counts(tmp_path, capsys):
    out = tmp_path / "plain.png"
    rc = main(["generate", "--model", "tiny", "--prompt", "a red car", "--no-merge", *SMALL, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    _check_png(out)
    assert all(" merged -" in line for line in _step_lines(captured.out))
    assert "no merging" in captured.out


@pytest.mark.parametrize("argv,message", [
    (["--model", "tiny"], "--prompt is missing"),
    (["--prompt", "x"], "say what to run"),
    (["--model", "tiny", "--prompt", "x", "--resolution", "65"], "multiple of 8"),
    (["--model", "tiny", "--prompt", "x", "--resolution", "64x100"], "multiple of 8"),
    (["--model", "tiny", "--prompt", "x", "--steps", "0"], "steps must be"),
    (["--model", "tiny", "--prompt", "   "], "prompt is empty"),
    (["--engine", "/no/such/engine/dir", "--prompt", "x"], "does not exist"),
    (["--model", "tiny", "--prompt", "x", "--no-merge", "--threshold", "0.5"], "--no-merge"),
    (["--model", "tiny", "--prompt", "x", "--out", "image.jpg"], ".png"),
    (["--model", "/no/such/pipeline", "--prompt", "x", *SMALL], "unknown model"),
    # checked before the (missing) pipeline would be loaded
    (["--model", "/no/such/pipeline", "--prompt", "x", "--threshold", "2"], "threshold must be a number in [-1, 1]"),
])
def test_bad_inputs_exit_1_without_traceback(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["generate", *argv])
    captured = capsys.readouterr()
    assert rc == 1
    assert captured.err.startswith("error: ") and message in captured.err
    assert "Traceback" not in captured.err


def test_generate_tiny_xl_merges_at_sdxl_level(tmp_path, capsys):
    """The SDXL layout through the command line: StableDiffusionXLPipeline, ten sites at downsample 2."""
    out = tmp_path / "xl.png"
    rc = main(["generate", "--model", "tiny-xl", "--prompt", "a red car", *SMALL, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    _check_png(out)
    lines = _step_lines(captured.out)
    assert len(lines) == 2 and all(STEP_LINE.match(line) for line in lines)
    assert "matched [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in lines[0]  # ten merge sites, all matching at step 0
    assert f"wrote {out} (64x64" in captured.out


def test_generate_with_an_engine_runtime_and_r_multiple(tmp_path, capsys, monkeypatch, tiny_engine_runtime):
    from catome_export.runtime import Runtime

    loaded = []

    def fake_load(engine_dir, backend="auto", device=None, **kwargs):
        loaded.append(tiny_engine_runtime())
        return loaded[-1]

    monkeypatch.setattr(Runtime, "load", staticmethod(fake_load))
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    rc = main(["generate", "--engine", str(engine_dir), "--prompt", "a red car", "--steps", "2", "--threshold",
               "0.3", "--schedule", "every_step", "--r-multiple", "8", "--out", str(tmp_path / "e.png")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    runtime = loaded[0]
    assert runtime.settings.r_multiple == 8 and "r in multiples of 8" in captured.out
    counts = [r for record in runtime.history for r in record.merged.values()]
    assert counts and any(counts) and all(r % 8 == 0 for r in counts)
    rc = main(["generate", "--engine", str(engine_dir), "--prompt", "a red car", "--no-merge", "--r-multiple", "8",
               "--out", str(tmp_path / "f.png")])
    err = capsys.readouterr().err
    assert rc == 1 and "leave out --threshold, --schedule and --r-multiple" in err
