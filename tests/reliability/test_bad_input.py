"""Bad input, one test per row of the table in docs/reliability.md.

Library calls raise ``catome_export.CatomeError`` (the one documented
exception type) with a message that says what to do; the command line turns
it into ``error: ...`` on stderr and exit code 1, without a traceback
(argparse usage errors keep exit code 2). Most command-line rows run
``main()`` in this process (any other exception would fail the test, as a
traceback would); a few run the real console entry point in a child process.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import catome_export
from catome_export.cli.main import main
from catome_export.errors import CatomeError

TEXT_LEN, TEXT_DIM = 77, 32
"""Text embedding shape of the tiny model."""


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)`` in process: (exit code, stderr); stderr never holds a traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def assert_cli_error(argv: list[str], capsys, *needles: str) -> str:
    """The command exits 1 with ``error: ...`` naming every needle."""
    code, err = run_cli(argv, capsys)
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def inputs(batch: int = 1, latent: tuple[int, int] = (16, 16), dtype: torch.dtype = torch.float32,
           device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, timestep, encoder_hidden_states) for the tiny engine."""
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, *latent, generator=gen).to(device=device, dtype=dtype)
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen).to(device=device, dtype=dtype)
    return sample, torch.tensor(999.0), text


def test_one_documented_exception_type():
    assert catome_export.CatomeError is CatomeError and "CatomeError" in catome_export.__all__
    assert issubclass(CatomeError, Exception) and CatomeError.__doc__


# -- models ------------------------------------------------------------------------------------------------
def test_unknown_model(capsys, tmp_path):
    from catome_export.models import load_unet, model_info

    for call in (lambda: load_unet("nosuchmodel", "random"), lambda: model_info("nosuchmodel")):
        with pytest.raises(catome_export.CatomeError, match="unknown model 'nosuchmodel': use one of 'tiny', 'tiny-xl', 'sd15'"):
            call()
    assert_cli_error(["build", "--model", "nosuchmodel", "--out", str(tmp_path / "e")], capsys,
                     "unknown model", "use one of 'tiny'")
    assert not (tmp_path / "e").exists()


def test_no_merge_site_at_the_chosen_level(capsys):
    """SDXL's layout (tiny-xl) has no attention at the top level: max_downsample=1 merges nothing, refused."""
    from catome_export import apply_catome
    from catome_export.eager import apply_tome
    from catome_export.models import find_merge_sites, load_unet

    unet = load_unet("tiny-xl", "random")
    for call in (lambda: find_merge_sites(unet, 1), lambda: apply_catome(unet, max_downsample=1),
                 lambda: apply_tome(unet, max_downsample=1)):
        with pytest.raises(CatomeError, match=r"no transformer block at downsample <= 1, so nothing would be merged: "
                                              r".*use max_downsample=2, or leave it unset"):
            call()
    assert not unet._forward_pre_hooks  # nothing was left installed


def test_model_that_is_not_a_unet(capsys, tmp_path):
    """A transformer-based model (SD3-style config, or any module without U-Net levels) is refused by name."""
    from catome_export import apply_catome
    from catome_export.models import find_merge_sites, load_unet

    folder = tmp_path / "sd3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(CatomeError, match="holds a SD3Transformer2DModel, not a UNet2DConditionModel"):
        load_unet(str(folder), "random")
    assert_cli_error(["build", "--model", str(folder), "--out", str(tmp_path / "e")], capsys,
                     "not a UNet2DConditionModel", "transformer-based models")
    with pytest.raises(CatomeError, match="is a Linear, not a diffusers UNet2DConditionModel"):
        find_merge_sites(torch.nn.Linear(2, 2))
    with pytest.raises(CatomeError, match="expected a diffusers UNet2DConditionModel"):
        apply_catome(torch.nn.Linear(2, 2))
    assert not (tmp_path / "e").exists()


def test_unknown_model_real_process(cli_process, tmp_path):
    proc = cli_process(["build", "--model", "nosuchmodel", "--out", str(tmp_path / "e")])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: unknown model 'nosuchmodel'")


def test_pretrained_weights_unavailable_offline(child_env, tmp_path):
    """sd15 with HF_HUB_OFFLINE=1 and an empty hub cache: the library and the CLI name --weights random.

    One child process (the hub reads HF_HUB_OFFLINE when it is imported): ``load_unet`` first, then the
    command line's ``main`` as the console script runs it.
    """
    import subprocess
    import sys

    out = tmp_path / "e"
    code = ("import sys\n"
            "from catome_export import CatomeError\n"
            "from catome_export.cli.main import main\n"
            "from catome_export.models import load_unet\n"
            "try:\n    load_unet('sd15')\n"
            "except CatomeError as exc:\n    print('CatomeError:', exc, flush=True)\n"
            f"sys.exit(main(['build', '--model', 'sd15', '--out', {str(out)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=child_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home")))
    assert proc.stdout.startswith("CatomeError: cannot load pretrained weights"), proc.stdout + proc.stderr
    assert "--weights random" in proc.stdout
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot load pretrained weights") and "--weights random" in last
    assert not out.exists()


# -- merge settings ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf, 1.5, -1.01])
def test_threshold_nan_or_outside_range(value, capsys, tmp_path):
    from catome_export.merging import MergeSettings, match_tokens

    with pytest.raises(catome_export.CatomeError, match=r"threshold must be a number in \[-1, 1\]"):
        MergeSettings(threshold=value)
    with pytest.raises(catome_export.CatomeError, match=r"threshold must be a number in \[-1, 1\]"):
        match_tokens(torch.randn(1, 16, 8), (4, 4), threshold=value)
    assert_cli_error(["build", "--model", "tiny", f"--threshold={value}", "--out", str(tmp_path / "e")], capsys,
                     "threshold must be a number in [-1, 1]")


def test_threshold_edges_are_accepted():
    from catome_export.merging import MergeSettings, match_tokens

    for t in (-1.0, 1.0):
        MergeSettings(threshold=t)
    x = torch.ones(2, 16, 8)  # every pair has similarity 1: still nothing merges at t = 1
    assert match_tokens(x, (4, 4), threshold=1.0).num_merged == 0
    assert match_tokens(x, (4, 4), threshold=-1.0).num_merged == 12


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, math.nan])
def test_ratio_outside_range(value):
    from catome_export.merging import MergeSettings, match_tokens

    with pytest.raises(catome_export.CatomeError, match=r"ratio must be (a number )?in \[0, 1\)"):
        MergeSettings(threshold=None, ratio=value)
    with pytest.raises(catome_export.CatomeError, match=r"ratio must be in \[0, 1\)"):
        match_tokens(torch.randn(1, 16, 8), (4, 4), ratio=value)


@pytest.mark.parametrize("spec,cli,needle", [
    ([], None, "is empty: give at least one step number"),
    ("", "", "the schedule is empty: name one (config1"),
    ([3, -1], "3,-1", "step numbers must be >= 0, got -1"),
    ([5, 5], "5,5", "repeats step numbers [5]: list each step once"),
    ("fast", "fast", "unknown schedule 'fast': use one of config1"),
], ids=["empty-list", "empty-text", "negative", "duplicated", "unknown-name"])
def test_bad_schedule(spec, cli, needle, capsys, tmp_path):
    from catome_export.merging import parse_schedule

    with pytest.raises(catome_export.CatomeError) as info:
        parse_schedule(spec)
    assert needle in str(info.value)
    if cli is not None:
        assert_cli_error(["build", "--model", "tiny", f"--schedule={cli}", "--out", str(tmp_path / "e")], capsys,
                         needle)


@pytest.mark.parametrize("value", [2, -1, True, "1"])
def test_step_base_other_than_0_or_1(value):
    from catome_export.merging import parse_schedule

    with pytest.raises(catome_export.CatomeError, match=r"step_base must be 0 \(paper numbering\) or 1"):
        parse_schedule("config3", step_base=value)


def test_step_base_on_the_command_line_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["build", "--model", "tiny", "--step-base", "2"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert "argument --step-base: invalid choice: 2 (choose from 0, 1)" in err


# -- resolution and batch ----------------------------------------------------------------------------------
def test_resolution_not_a_multiple_of_8(reliability_engine, capsys, tmp_path):
    from catome_export.engine.options import make_options

    with pytest.raises(catome_export.CatomeError, match="resolution 100 is not a multiple of 8.*use e.g. 96 or 104"):
        make_options("tiny", resolution=100)
    assert_cli_error(["build", "--model", "tiny", "--resolution", "100", "--out", str(tmp_path / "e")], capsys,
                     "not a multiple of 8", "96 or 104")
    assert_cli_error(["verify", "--engine", str(reliability_engine), "--resolution", "100"], capsys, "multiples of 8")
    assert_cli_error(["generate", "--engine", str(reliability_engine), "--prompt", "a cat", "--resolution", "100",
                      "--out", str(tmp_path / "x.png")], capsys, "multiple of 8", "96 or 104")


@pytest.mark.parametrize("latent", [(8, 8), (32, 32), (16, 32)], ids=["64px", "256px", "128x256px"])
def test_resolution_outside_the_built_range(ort_runtime, latent):
    sample, t, text = inputs(latent=latent)
    with pytest.raises(catome_export.CatomeError) as info:
        ort_runtime.unet(sample, t, encoder_hidden_states=text)
    from catome_export.cli.rebuild import error_line

    msg = str(info.value)
    assert "outside the built range 16..24 (128..192 px)" in msg and "catome-export build" in msg
    line = error_line(info.value)  # what the command line prints
    assert f"--min-resolution {min(128, 8 * min(latent))}" in line
    assert f"--max-resolution {max(192, 8 * max(latent))}" in line


def test_resolution_outside_the_built_range_cli(reliability_engine, capsys):
    assert_cli_error(["verify", "--engine", str(reliability_engine), "--resolution", "256", "--steps", "1"], capsys,
                     "outside the built range", "--max-resolution 256")


@pytest.mark.parametrize("batch", [0, 3])
def test_batch_zero_or_above_the_built_range(ort_runtime, batch):
    sample, t, text = inputs(batch=batch)
    with pytest.raises(catome_export.CatomeError, match=f"batch {batch} is outside the built range 1..2.*"
                                                        "catome-export build"):
        ort_runtime.unet(sample, t, encoder_hidden_states=text)


def test_batch_on_the_command_line(reliability_engine, capsys, tmp_path):
    assert_cli_error(["build", "--model", "tiny", "--batch", "0", "--out", str(tmp_path / "e")], capsys,
                     "batch must be an int in 1..256, got 0")
    assert_cli_error(["verify", "--engine", str(reliability_engine), "--batch", "0"], capsys, "batch must be an int >= 1")
    assert_cli_error(["verify", "--engine", str(reliability_engine), "--batch", "3", "--steps", "1"], capsys,
                     "batch 3 is outside the built range 1..2", "--max-batch 3")


# -- engine folders ----------------------------------------------------------------------------------------
def _load(folder):
    from catome_export.runtime import Runtime

    return Runtime.load(folder, backend="ort", backend_options={"intra_op_threads": 1})


def test_engine_folder_missing(tmp_path, capsys):
    missing = tmp_path / "engines" / "nope"
    with pytest.raises(catome_export.CatomeError, match="engine folder .* does not exist: build it with "
                                                        "catome-export build"):
        _load(missing)
    assert_cli_error(["verify", "--engine", str(missing)], capsys, "does not exist", "catome-export build")


@pytest.mark.parametrize("name, model", [("sdxl", "sdxl"), ("sd21", "sd21"), ("tiny-xl", "tiny-xl"),
                                         ("my-engine", "MODEL")])
def test_missing_engine_folder_names_its_model_when_the_folder_is_a_registry_name(tmp_path, name, model):
    from catome_export.cli.rebuild import error_line

    with pytest.raises(catome_export.CatomeError, match="build it with catome-export build, naming the model") as err:
        _load(tmp_path / "engines" / name)
    assert f"build it with catome-export build --model {model} --name {name} " in error_line(err.value)


def test_half_made_engine_folder(engine_copy, capsys):
    """A folder without manifest.json (what a killed build leaves) is never loaded."""
    (engine_copy / "manifest.json").unlink()
    with pytest.raises(catome_export.CatomeError, match=r"has no manifest.json \(not a finished build\)"):
        _load(engine_copy)
    assert_cli_error(["verify", "--engine", str(engine_copy)], capsys, "not a finished build")


def test_engine_path_is_a_file(engine_copy, capsys):
    with pytest.raises(catome_export.CatomeError, match="is a file, not an engine folder: pass its folder"):
        _load(engine_copy / "manifest.json")
    assert_cli_error(["verify", "--engine", str(engine_copy / "stage_0.onnx")], capsys, "is a file, not an engine folder")


def test_truncated_stage_file(engine_copy, capsys):
    stage = engine_copy / "stage_2.onnx"
    with open(stage, "r+b") as fh:
        fh.truncate(stage.stat().st_size // 2)
    with pytest.raises(catome_export.CatomeError, match="stage_2.onnx has .* bytes, the manifest records .* "
                                                        r"\(truncated or replaced\): rebuild it with catome-export build"):
        _load(engine_copy)
    assert_cli_error(["verify", "--engine", str(engine_copy)], capsys, "truncated", "rebuild it with catome-export build")


def test_corrupted_stage_file(engine_copy, capsys):
    stage = engine_copy / "stage_3.onnx"
    data = bytearray(stage.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    stage.write_bytes(bytes(data))
    with pytest.raises(catome_export.CatomeError, match=r"stage_3.onnx does not match its sha256 in the manifest "
                                                        r"\(damaged or replaced\): rebuild it"):
        _load(engine_copy)
    assert_cli_error(["verify", "--engine", str(engine_copy)], capsys, "does not match its sha256")


def _edit_manifest(folder, edit) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def test_manifest_from_another_version(engine_copy, capsys):
    _edit_manifest(engine_copy, lambda d: d.update(format_version=2))
    from catome_export.cli.rebuild import error_line

    with pytest.raises(catome_export.CatomeError, match="has format_version 2; this catome-export .* reads version 1: "
                                                        "rebuild with catome-export build") as err:
        _load(engine_copy)
    assert "reads version 1: rebuild with catome-export build --model tiny" in error_line(err.value)
    assert_cli_error(["verify", "--engine", str(engine_copy)], capsys, "format_version 2", "rebuild with")


def test_manifest_edited_by_hand(engine_copy, capsys):
    _edit_manifest(engine_copy, lambda d: d["shapes"].update(batch=[1, 8]))  # e.g. widening the range by hand
    with pytest.raises(catome_export.CatomeError, match=r"was modified or damaged \(its manifest_sha256 does not "
                                                        "match its contents\\): rebuild with catome-export build"):
        _load(engine_copy)
    assert_cli_error(["verify", "--engine", str(engine_copy)], capsys, "was modified or damaged")


def test_manifest_not_json(engine_copy, capsys):
    path = engine_copy / "manifest.json"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(catome_export.CatomeError, match=r"is unreadable \(JSONDecodeError\): rebuild with"):
        _load(engine_copy)


def test_damaged_engine_real_process(engine_copy, cli_process):
    (engine_copy / "stage_1.onnx").write_bytes(b"not an onnx graph")
    proc = cli_process(["verify", "--engine", str(engine_copy), "--steps", "1"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: engine ")


def test_unwritable_out_folder(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_cli_error(["build", "--model", "tiny", "--resolution", "128", "--no-verify",
                      "--out", str(blocker / "engine")], capsys, "cannot create the folder", "writable folder")


@pytest.mark.parametrize("ort_optimize, needles", [
    ("on", ("the stage graphs", "ONNX Runtime's fused copies", "--ort-optimize off")),
    ("off", ("the stage graphs",))])
def test_a_build_that_cannot_fit_on_its_disk_is_refused_before_the_export(engine_copy, capsys, monkeypatch,
                                                                          ort_optimize, needles):
    """Free space is checked once the U-Net is loaded (its size known), before any stage is written: the existing
    build is untouched and no temporary folder is left."""
    import collections

    from catome_export.export import build as build_module

    before = {p.name: p.read_bytes() for p in engine_copy.iterdir()}
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(build_module.shutil, "disk_usage", lambda path: usage(1 << 40, (1 << 40) - (1 << 20), 1 << 20))
    last = assert_cli_error(["build", "--model", "tiny", "--resolution", "128", "--no-verify", "--ort-optimize",
                             ort_optimize, "--out", str(engine_copy)], capsys,
                            "this build writes about", "0.0 GB free", "choose an --out on a larger disk", *needles)
    assert ("--ort-optimize off" in last) == (ort_optimize == "on")
    assert {p.name: p.read_bytes() for p in engine_copy.iterdir()} == before
    assert sorted(p.name for p in engine_copy.parent.iterdir()) == ["tiny"]


def test_a_verification_that_cannot_fit_in_memory_is_refused_before_the_work(engine_copy, capsys, monkeypatch):
    """On the CPU, verifying needs the eager U-Net and the engine at once: a build asked to verify is refused before
    its export (nothing changed), and catome-export verify before loading anything, each naming what to do."""
    from catome_export import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    before = {p.name: p.read_bytes() for p in engine_copy.iterdir()}
    assert_cli_error(["build", "--model", "tiny", "--resolution", "128", "--out", str(engine_copy)], capsys,
                     "verifying this build on the CPU", "needs at least", "available", "--no-verify",
                     "catome-export verify on a machine with more memory")
    assert {p.name: p.read_bytes() for p in engine_copy.iterdir()} == before
    assert sorted(p.name for p in engine_copy.parent.iterdir()) == ["tiny"]
    assert_cli_error(["verify", "--engine", str(engine_copy), "--steps", "1"], capsys, f"verifying {engine_copy} on the CPU",
                     "needs at least", "verify on a machine with more memory (or on a GPU)")


# -- runtime.unet inputs -----------------------------------------------------------------------------------
def test_runtime_unet_accepts_good_inputs(ort_runtime):
    """The inputs the bad-input rows below spoil run fine as they are."""
    ort_runtime.reset()
    sample, t, text = inputs(batch=2)
    out = ort_runtime.unet(sample, t, encoder_hidden_states=text, return_dict=False)[0]
    assert out.shape == sample.shape and out.dtype == torch.float32 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("which,dtype", [("sample", torch.float64), ("sample", torch.float16),
                                         ("encoder_hidden_states", torch.float16),
                                         ("encoder_hidden_states", torch.bfloat16)])
def test_runtime_unet_wrong_dtype(ort_runtime, which, dtype):
    sample, t, text = inputs()
    if which == "sample":
        sample = sample.to(dtype)
    else:
        text = text.to(dtype)
    with pytest.raises(catome_export.CatomeError, match=f"{which} is {dtype}, the engine runs in torch.float32: "
                                                        f"pass torch.float32 inputs"):
        ort_runtime.unet(sample, t, encoder_hidden_states=text)


def test_runtime_unet_wrong_device(ort_runtime):
    sample, t, text = inputs()
    with pytest.raises(catome_export.CatomeError, match="sample is on meta, the engine runs on cpu: move the inputs"):
        ort_runtime.unet(sample.to("meta"), t, encoder_hidden_states=text)
    with pytest.raises(catome_export.CatomeError, match="encoder_hidden_states is on meta, the engine runs on cpu"):
        ort_runtime.unet(sample, t, encoder_hidden_states=text.to("meta"))


@pytest.mark.parametrize("change,needle", [
    (lambda s, t, e: (s[0], t, e), r"sample must be a \[B, 4, H, W\] tensor, got \(4, 16, 16\)"),
    (lambda s, t, e: (torch.cat([s, s[:, :1]], 1), t, e), r"sample must be a \[B, 4, H, W\] tensor, got \(1, 5"),
    (lambda s, t, e: (s.numpy(), t, e), r"sample must be a \[B, 4, H, W\] tensor, got ndarray"),
    (lambda s, t, e: (s, t, e[0]), r"encoder_hidden_states must be a \[B, L, D\] tensor"),
    (lambda s, t, e: (s, t, e[..., :16]), "encoder_hidden_states has width 16, the engine expects 32"),
    (lambda s, t, e: (s, t, torch.cat([e, e])), "encoder_hidden_states has batch 2, sample has 1: they must match"),
    (lambda s, t, e: (s, torch.zeros(2, 2), e), "timestep must be a number, a scalar tensor, or a"),
    (lambda s, t, e: (s, "999", e), "timestep must be a number or a tensor, got str"),
], ids=["sample-3d", "sample-5-channels", "sample-numpy", "text-2d", "text-width", "text-batch",
        "timestep-2d", "timestep-str"])
def test_runtime_unet_wrong_shape(ort_runtime, change, needle):
    sample, t, text = change(*inputs())
    with pytest.raises(catome_export.CatomeError, match=needle):
        ort_runtime.unet(sample, t, encoder_hidden_states=text)


def test_runtime_unet_unsupported_arguments(ort_runtime):
    sample, t, text = inputs()
    with pytest.raises(catome_export.CatomeError, match="cannot take .*down_block_additional_residuals.*pass them "
                                                        "as None"):
        ort_runtime.unet(sample, t, encoder_hidden_states=text, down_block_additional_residuals=(sample,))
    with pytest.raises(catome_export.CatomeError, match=r"does not take \['lora_scale'\]"):
        ort_runtime.unet(sample, t, encoder_hidden_states=text, lora_scale=0.5)


def _unwritable(kind: str, tmp_path, name: str):
    """A path no run can write, as root too: under a file, or in /proc."""
    if kind == "under-a-file":
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a file")
        return blocker / "sub" / name
    return f"/proc/{name}"


@pytest.mark.parametrize("kind", ["under-a-file", "proc"])
@pytest.mark.parametrize("command", ["generate", "bench-json", "bench-plot", "analyze-plot", "verify-json"])
def test_unwritable_output_is_refused_before_the_run(command, kind, tmp_path, capsys, monkeypatch):
    """Each output flag is checked before any model is loaded or step run, so no result is computed and lost."""
    import catome_export.models.registry as registry

    def no_model_loads(*args, **kwargs):
        raise AssertionError("the output should have been refused before a model was loaded")

    monkeypatch.setattr(registry, "load_unet", no_model_loads)
    argv = {
        "generate": ["generate", "--model", "tiny", "--prompt", "a fox", "--steps", "2",
                     "--out", str(_unwritable(kind, tmp_path, "fox.png"))],
        "bench-json": ["bench", "--model", "tiny", "--json", str(_unwritable(kind, tmp_path, "b.json"))],
        "bench-plot": ["bench", "--model", "tiny", "--plot", str(_unwritable(kind, tmp_path, "b.png"))],
        "analyze-plot": ["analyze", "--model", "tiny", "--plot", str(_unwritable(kind, tmp_path, "p.png"))],
        "verify-json": ["verify", "--engine", str(tmp_path), "--json", str(_unwritable(kind, tmp_path, "v.json"))],
    }[command]
    if command == "analyze-plot" and kind == "under-a-file":
        expected = "does not exist"  # analyze asks for an existing folder first
    else:
        expected = "cannot write"
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the probe left nothing


def test_writable_output_check_creates_nothing(tmp_path):
    from catome_export.fsutil import check_writable_file

    target = tmp_path / "a" / "b" / "out.json"
    assert check_writable_file(target, "--json") == target
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CatomeError, match="is a folder"):
        check_writable_file(tmp_path, "--json")
