"""Where models come from on the command line: single-file checkpoints, --engine with --model, an unreachable hub."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from catome_export.cli.rebuild import build_command
from catome_export.cli.main import main
from catome_export.engine.manifest import Manifest
from checkpoints import ldm_clip_state_dict, ldm_unet_state_dict, ldm_vae_state_dict, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def full_file(tmp_path_factory):
    """A tiny SD 1.x-layout checkpoint with U-Net, VAE and text encoder (seed 5: none equal to the bundled seed 0)."""
    from catome_export.models.pipeline import tiny_pipeline

    pipe = tiny_pipeline(seed=5)
    with torch.no_grad():
        pipe.unet.conv_in.bias.add_(0.5)
    state = {**ldm_unet_state_dict(pipe.unet), **ldm_vae_state_dict(pipe.vae),
             **ldm_clip_state_dict(pipe.text_encoder)}
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-finetune.safetensors", state), pipe


@pytest.fixture(scope="module")
def xl_file(tmp_path_factory):
    from catome_export.models import load_unet

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "xl.safetensors",
                            ldm_unet_state_dict(load_unet("tiny-xl", "random")))


def _one_line_error(rc: int, err: str) -> str:
    assert rc == 1 and err.startswith("error: ") and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.slow
def test_build_and_verify_from_a_single_file_checkpoint(full_file, tmp_path, capsys):
    path, _ = full_file
    out = tmp_path / "engine"
    rc = main(["build", "--model", str(path), "--resolution", "64", "--verify-steps", "1", "--ort-optimize", "off",
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    manifest = Manifest.load(out)
    assert (manifest.name, manifest.model.id, manifest.model.weights) == ("tiny-finetune", "tiny", str(path))
    from catome_export.models import load_unet, weights_hash

    assert manifest.model.weights_hash == weights_hash(load_unet("tiny", weights=path))
    assert "verify OK" in captured.out
    assert f"--weights {path}" in build_command(manifest.rebuild_options())


def test_build_refuses_wrong_files_before_writing_anything(xl_file, tmp_path, capsys):
    out = tmp_path / "engine"
    line = _one_line_error(main(["build", "--model", "tiny", "--weights", str(xl_file), "--out", str(out)]),
                           capsys.readouterr().err)
    assert "does not fit tiny" in line and "--model tiny-xl --weights" in line
    lora = write_checkpoint(tmp_path / "lora.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)})
    line = _one_line_error(main(["build", "--model", str(lora), "--out", str(out)]), capsys.readouterr().err)
    assert "is a LoRA" in line
    line = _one_line_error(main(["build", "--model", "sd15", "--weights", str(tmp_path / "gone.ckpt"), "--out",
                                 str(out)]), capsys.readouterr().err)
    assert "no such file" in line
    assert not out.exists()


def _attached_pipes(monkeypatch, runtime_factory, model_id: str = "tiny") -> list:
    from catome_export.runtime import Runtime
    import catome_export.runtime.embed as embed

    def fake_load(engine_dir, backend="auto", device=None, **kwargs):
        return runtime_factory()

    monkeypatch.setattr(Runtime, "load", staticmethod(fake_load))
    pipes = []
    real_attach = embed.attach

    def spy_attach(pipe, runtime):
        pipes.append(pipe)
        return real_attach(pipe, runtime)

    monkeypatch.setattr(embed, "attach", spy_attach)
    return pipes


def test_generate_engine_with_the_components_of_another_model(full_file, tiny_engine_runtime, tmp_path, capsys,
                                                              monkeypatch):
    path, source = full_file
    pipes = _attached_pipes(monkeypatch, tiny_engine_runtime)
    (tmp_path / "engine").mkdir()
    rc = main(["generate", "--engine", str(tmp_path / "engine"), "--model", "tiny", "--weights", str(path),
               "--prompt", "a red car", "--steps", "2", "--out", str(tmp_path / "e.png")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "engine on torch" in captured.out and (tmp_path / "e.png").is_file()
    (pipe,) = pipes
    for name in ("vae", "text_encoder"):  # the file's, not the bundled pipeline's
        mine, theirs = getattr(pipe, name).state_dict(), getattr(source, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name


def test_generate_engine_refuses_a_model_that_does_not_fit(xl_file, tiny_engine_runtime, tmp_path, capsys,
                                                           monkeypatch):
    _attached_pipes(monkeypatch, tiny_engine_runtime)
    (tmp_path / "engine").mkdir()
    for model in (["--model", "tiny-xl"], ["--model", str(xl_file)]):
        line = _one_line_error(main(["generate", "--engine", str(tmp_path / "engine"), *model, "--prompt", "x",
                                     "--steps", "2", "--out", str(tmp_path / "x.png")]), capsys.readouterr().err)
        assert "does not fit the engine" in line and "cross_attention_dim=64" in line and "built from tiny" in line
    assert not (tmp_path / "x.png").exists()


def test_generate_weights_without_a_model_is_refused(full_file, tmp_path, capsys):
    line = _one_line_error(main(["generate", "--engine", str(tmp_path), "--weights", str(full_file[0]), "--prompt",
                                 "x", "--out", str(tmp_path / "x.png")]), capsys.readouterr().err)
    assert "give --model too" in line


# -- an unreachable hub: seconds, not a minute of retries ------------------------------------
_TIMED = """
import contextlib, io, json, sys, time
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # imported before the clock starts
from catome_export.cli.main import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append({"rc": rc, "seconds": time.perf_counter() - start, "err": err.getvalue()})
print(json.dumps(results))
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a Python process each (the imports take most of its time)
@pytest.mark.parametrize("offline_flag", [False, True], ids=["unreachable", "HF_HUB_OFFLINE"])
def test_an_unreachable_hub_fails_in_seconds_with_the_ways_out(offline_flag, tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    if offline_flag:
        env["HF_HUB_OFFLINE"] = "1"
    runs = [["build", "--model", "sd15", "--no-verify", "--out", str(tmp_path / "engine")],
            ["generate", "--model", "sd15", "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "x.png")]]
    proc = subprocess.run([sys.executable, "-c", _TIMED, json.dumps(runs)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    build, generate = json.loads(proc.stdout.strip().splitlines()[-1])
    for run in (build, generate):
        line = _one_line_error(run["rc"], run["err"][run["err"].index("error: "):])
        assert "Retrying" not in run["err"]
        # the retries this replaces slept 1 + 2 + 4 + 8 + 8 s per file request, twice
        assert run["seconds"] < 15, run
        assert "HF_HUB_OFFLINE=1" in line and "not in the local Hugging Face cache" in line
        assert ("HF_HUB_OFFLINE=1 is set" if offline_flag else "cannot be reached") in line
    build_line = build["err"][build["err"].index("error: "):]
    assert "--weights random" in build_line and "--model sd15 --weights model.safetensors" in build_line
    assert "local diffusers folder" in build_line
    assert "--model tiny" in generate["err"]
    assert not (tmp_path / "engine").exists() and not (tmp_path / "x.png").exists()


def test_bench_and_eval_take_checkpoints(full_file, tmp_path, capsys):
    from catome_export.bench.engine import work_name
    from catome_export.cli.cmd_bench import config_from_args
    from catome_export.cli.main import build_parser

    path, _ = full_file
    for argv in (["--model", str(path)], ["--model", "tiny", "--weights", str(path)]):
        config = config_from_args(build_parser().parse_args(["bench", *argv, "--workdir", str(tmp_path)]))
        assert (config.model, config.weights) == ("tiny", str(path))
        assert work_name(config) == "tiny-tiny-finetune-fp32"  # a folder name, not a path
    line = _one_line_error(main(["bench", "--model", "sd15", "--weights", str(path), "--workdir", str(tmp_path)]),
                           capsys.readouterr().err)
    assert "does not fit sd15" in line and "--model tiny --weights" in line
    (tmp_path / "engine").mkdir()
    line = _one_line_error(main(["eval", "--engine", str(tmp_path / "engine"), "--weights", str(path), "--imagenet",
                                 "1", "--out", str(tmp_path / "ev")]), capsys.readouterr().err)
    assert "give --model too" in line  # with --engine the model defaults to the engine's: the file needs a model
