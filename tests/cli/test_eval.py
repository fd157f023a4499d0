"""``catome-export eval`` on the offline tiny pipeline, and the eval runner with engine methods."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from catome_export.cli.main import main
from catome_export.errors import CatomeError

SMALL = ["--steps", "2", "--resolution", "64", "--warmup", "0"]
NO_CLIP = ["--clip-model", "catome-export-tests/no-such-clip-model"]


@pytest.fixture
def no_fid_weights(tmp_path, monkeypatch):
    """An empty torch hub cache, so FID is missing whatever this machine has."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.mark.slow
def test_eval_tiny_writes_json_with_psnr_ssim_and_the_missing_metrics(tmp_path, capsys, no_fid_weights):
    out = tmp_path / "eval"
    rc = main(["eval", "--model", "tiny", "--imagenet", "2", *SMALL, *NO_CLIP, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in data["summary"]}
    assert list(rows) == ["baseline", "catome"]
    assert rows["baseline"]["psnr"] is None and rows["baseline"]["ssim"] is None
    cat = rows["catome"]
    assert isinstance(cat["psnr"], float) and cat["psnr"] > 10
    assert isinstance(cat["ssim"], float) and 0 < cat["ssim"] <= 1
    assert cat["seconds_per_image"] > 0 and cat["fid"] is None and cat["clip"] is None
    assert cat["setting"] == "t=0.7, config3"
    assert data["prompts"] == ["A high-quality photograph of a tench.",
                               "A high-quality photograph of a cliff dwelling."]
    per_image = data["per_image"]["catome"]
    assert [p["seed"] for p in per_image] == [0, 1]
    for method in ("baseline", "catome"):
        for item in data["per_image"][method]:
            with Image.open(out / item["image"]) as im:
                assert im.format == "PNG" and im.size == (64, 64)
    # the PSNR in the JSON is the one of the written images
    base = np.asarray(Image.open(out / data["per_image"]["baseline"][0]["image"]), dtype=np.float64)
    mine = np.asarray(Image.open(out / per_image[0]["image"]), dtype=np.float64)
    mse = np.mean((base - mine) ** 2)
    expected = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    assert per_image[0]["psnr"] == ("inf" if np.isinf(expected) else pytest.approx(expected, rel=1e-9))
    assert data["metrics"]["FID"]["available"] is False and data["metrics"]["CLIP"]["available"] is False
    assert "FID: not computed" in captured.out and "CLIP: not computed" in captured.out
    assert "to get it" in captured.out
    table = (out / "results.md").read_text()
    assert table.startswith("| method | setting | s/image | PSNR (dB) | SSIM | FID | CLIP |")
    assert "| catome | t=0.7, config3 |" in table


@pytest.mark.slow
def test_eval_tiny_xl_merges_at_its_own_level(tmp_path, capsys, no_fid_weights):
    out = tmp_path / "eval"
    rc = main(["eval", "--model", "tiny-xl", "--imagenet", "1", "--methods", "tome,catome", *SMALL, *NO_CLIP,
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = {row["method"]: row for row in json.loads((out / "results.json").read_text())["summary"]}
    assert list(rows) == ["baseline", "tome", "catome"]
    assert isinstance(rows["tome"]["psnr"], float) and rows["tome"]["psnr"] < 100  # ToMe 0.5 changed the image


@pytest.mark.slow
def test_eval_prompt_file_and_extra_methods(tmp_path, capsys, no_fid_weights):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n")
    out = tmp_path / "eval"
    rc = main(["eval", "--model", "tiny", "--prompts", str(prompts), "--methods", "tome,catome", "--threshold", "1",
               *SMALL, *NO_CLIP, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = {row["method"]: row for row in json.loads((out / "results.json").read_text())["summary"]}
    assert list(rows) == ["baseline", "tome", "catome"]  # baseline always runs first
    assert rows["tome"]["merged_fraction"] == pytest.approx(0.5)  # ratio 0.5 of the 64 tokens
    assert rows["tome"]["psnr"] < 100  # merged: a different image
    assert rows["catome"]["merged_fraction"] == 0.0  # t = 1 merges nothing ...
    assert rows["catome"]["psnr"] > 60 and rows["catome"]["ssim"] > 0.999  # ... so it is the baseline image


def test_run_eval_with_engine_methods_restores_the_engine_settings(tmp_path, tiny_engine_runtime):
    from catome_export.workflows.evaluate import EvalConfig, run_eval

    runtime = tiny_engine_runtime()
    own = runtime.settings
    config = EvalConfig(prompts=("a red car",), out=tmp_path / "eval", model="tiny", steps=2, warmup=0,
                        height=64, width=64, clip_model="catome-export-tests/no-such-clip-model")
    report = run_eval(config, runtime=runtime)
    rows = {row["method"]: row for row in report.rows()}
    assert list(rows) == ["baseline", "engine-baseline", "engine"]
    assert rows["engine-baseline"]["psnr"] > 60  # the engine without merging reproduces the eager baseline
    assert rows["engine-baseline"]["merged_fraction"] == 0.0
    assert rows["engine"]["setting"] == "t=0.7, config3"
    assert runtime.settings == own and not runtime._closed  # a runtime passed in stays open, settings restored
    runtime.close()


def test_eval_a_built_engine_against_the_model_it_was_built_from(built_engine, tmp_path, capsys, no_fid_weights):
    out = tmp_path / "eval"
    rc = main(["eval", "--engine", str(built_engine), "--backend", "ort", "--imagenet", "1", "--steps", "2",
               "--resolution", "128", "--warmup", "0", *NO_CLIP, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in data["summary"]}
    assert list(rows) == ["baseline", "engine-baseline", "engine"]
    assert rows["engine-baseline"]["psnr"] > 60  # the engine without merging = the eager U-Net it was built from
    assert data["engine"] == str(built_engine) and data["height"] == 128


def test_eval_outside_the_engines_range_exits_1(built_engine, tmp_path, capsys):
    rc = main(["eval", "--engine", str(built_engine), "--backend", "ort", "--imagenet", "1", "--steps", "2",
               "--resolution", "64", "--warmup", "0", *NO_CLIP, "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert rc == 1 and captured.err.startswith("error: ") and "catome-export build" in captured.err


@pytest.mark.parametrize("argv,message", [
    (["--engine", "/no/such/engine/dir"], "does not exist"),
    (["--imagenet", "0"], "must be an int >= 1"),
    (["--prompts", "/no/such/prompts.txt"], "does not exist"),
    (["--methods", "baseline,fast"], "unknown methods"),
    (["--methods", "engine"], "need --engine"),
    (["--resolution", "60"], "multiple of 8"),
    (["--steps", "0"], "steps must be"),
    (["--warmup", "-1"], "warmup"),
    (["--threshold", "1.5"], "threshold must be a number in [-1, 1]"),
    (["--ratio", "1"], "ratio must be a number in [0, 1)"),
    (["--methods", "baseline,deepcache", "--feature-cache", "off"], "methods deepcache are feature caching"),
    (["--methods", "catome-deepcache", "--feature-cache", "off"], "methods catome-deepcache are feature caching"),
])
def test_bad_inputs_exit_1_without_traceback(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["eval", "--model", "tiny", *argv, "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert rc == 1
    assert captured.err.startswith("error: ") and message in captured.err
    assert "Traceback" not in captured.err


def test_eval_config_needs_prompts(tmp_path):
    from catome_export.workflows.evaluate import EvalConfig

    with pytest.raises(CatomeError, match="no prompts"):
        EvalConfig(prompts=(), out=tmp_path)


@pytest.mark.parametrize("flag,value,message", [("--threshold", "nan", "threshold must be"),
                                                ("--ratio", "-0.5", "ratio must be")])
def test_bad_merge_values_fail_before_any_model_load(flag, value, message, capsys, tmp_path, monkeypatch):
    # The model path does not exist: a check made after loading would report that instead.
    monkeypatch.chdir(tmp_path)
    rc = main(["eval", "--model", str(tmp_path / "no-such-pipeline"), flag, value, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and "no-such-pipeline" not in err


def test_eval_r_multiple_reaches_the_eager_and_the_engine_methods(tmp_path, tiny_engine_runtime):
    from catome_export.workflows.evaluate import EvalConfig, eager_settings, run_eval

    runtime = tiny_engine_runtime()
    own = runtime.settings
    config = EvalConfig(prompts=("a red car",), out=tmp_path / "eval", model="tiny", steps=2, warmup=0,
                        height=64, width=64, clip_model="catome-export-tests/no-such-clip-model",
                        methods=("baseline", "adaptive", "engine"), r_multiple=16)
    assert eager_settings("adaptive", config).r_multiple == 16
    assert eager_settings("tome", config).r_multiple == 16
    seen = []
    runtime.set_settings = (lambda set_settings: lambda settings, **kw: (seen.append(settings),
                                                                          set_settings(settings, **kw))[1])(
        runtime.set_settings)
    report = run_eval(config, runtime=runtime)
    assert [s.r_multiple for s in seen[:1]] == [16]  # the engine method ran rounded ...
    assert runtime.settings == own  # ... and the engine's own settings came back afterwards
    rows = {row["method"]: row for row in report.rows()}
    assert set(rows) == {"baseline", "adaptive", "engine"}
    runtime.close()


def test_eval_bad_r_multiple_exits_1_before_any_model_load(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["eval", "--model", str(tmp_path / "no-such-pipeline"), "--r-multiple", "0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "--r-multiple must be a whole number" in err and "no-such-pipeline" not in err
