"""TensorRT / GPU compatibility of an engine folder, with the machine's side injected (no TensorRT needed)."""

from __future__ import annotations

import shlex
from dataclasses import replace

import pytest

from catome_export.errors import CatomeError
from catome_export.engine.manifest import BuildRecord, Manifest
from catome_export.merging import MergeSettings, parse_schedule
from factories import make_manifest, make_shapes, make_trt
from catome_export.backends.trt_compat import TrtRuntimeInfo, check_shapes_in_profiles, check_trt_compat, rebuild_error
from catome_export.cli.rebuild import error_line
from catome_export.cli.rebuild import rebuild_command as format_rebuild


def rebuild_command(manifest: Manifest, engine_dir: str | None = None) -> str:
    """The build command the CLI prints for a TensorRT rebuild of ``manifest``'s folder."""
    return format_rebuild(rebuild_error(manifest, "rebuild", engine_dir))

H100 = TrtRuntimeInfo("10.3.0", "NVIDIA H100 80GB HBM3", "9.0")


def _manifest(**trt_overrides) -> Manifest:
    """An sd15 fp16 TensorRT build for an H100 (``trt_overrides`` replace fields of its trt record)."""
    profiles = ({"sample": {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [2, 4, 96, 96]}},)
    return make_manifest(name="sd15-trt", model="sd15", weights="random", precision="fp16",
                         merge=MergeSettings(threshold=0.7, schedule=parse_schedule("config3", 1)),
                         shapes=make_shapes((1, 2), (32, 96), opt_latent=(64, 64), merge_fraction=0.75),
                         trt=make_trt(**{"profiles": profiles, **trt_overrides}))


def test_same_machine_passes():
    check_trt_compat(_manifest(), H100)
    check_trt_compat(_manifest(), H100, batch=2, latent_hw=(64, 96))


@pytest.mark.parametrize("here", ["10.3.1.post2", "10.3.0.1", "10.4.0", "11.1.0.106"])
def test_any_other_tensorrt_version_refused(here):
    """Plans load only under the exact TensorRT build that made them: a patch release differs too."""
    with pytest.raises(CatomeError) as err:
        check_trt_compat(_manifest(), TrtRuntimeInfo(here, H100.gpu_name, "9.0"))
    msg = error_line(err.value)
    assert "10.3.0" in msg and here in msg and "exact" in msg
    assert "catome-export build --model sd15" in msg and "--engine-kind trt" in msg
    assert "pip install 'tensorrt==10.3.0'" in msg


@pytest.mark.parametrize("here", ["9.3.0", "10.0.1", "12.0.0"])
def test_unsupported_tensorrt_here_refused(here):
    with pytest.raises(CatomeError) as err:
        check_trt_compat(_manifest(), TrtRuntimeInfo(here, H100.gpu_name, "9.0"))
    msg = error_line(err.value)
    assert here in msg and "tensorrt>=10.1,<12" in msg and "--engine-kind trt" in msg


def test_manifest_without_version_refused():
    with pytest.raises(CatomeError, match="does not record the TensorRT version"):
        check_trt_compat(_manifest(version=None), H100)


def test_version_compatible_build_accepts_other_version():
    check_trt_compat(_manifest(version_compatible=True), TrtRuntimeInfo("10.5.0", H100.gpu_name, "9.0"))


def test_other_compute_capability_refused():
    with pytest.raises(CatomeError, match=r"compute capability 9\.0.*8\.9") as err:
        check_trt_compat(_manifest(), TrtRuntimeInfo("10.3.0", "NVIDIA L40S", "8.9"))
    assert "--engine-kind trt" in error_line(err.value)


def test_other_gpu_model_same_capability_refused():
    with pytest.raises(CatomeError, match="NVIDIA H100 PCIe") as err:
        check_trt_compat(_manifest(), TrtRuntimeInfo("10.3.0", "NVIDIA H100 PCIe", "9.0"))
    assert "rebuild" in str(err.value).lower() and "--engine-kind trt" in error_line(err.value)


def test_hardware_compatible_build_accepts_other_gpu():
    check_trt_compat(_manifest(hardware_compatibility_level="AMPERE_PLUS"),
                     TrtRuntimeInfo("10.3.0", "NVIDIA A100-SXM4-80GB", "8.0"))


def test_missing_tensorrt_names_it_and_the_install():
    with pytest.raises(CatomeError, match="TensorRT is not installed") as err:
        check_trt_compat(_manifest(), TrtRuntimeInfo(None, None, None))
    assert "pip install" in str(err.value)


def test_missing_gpu_refused():
    with pytest.raises(CatomeError, match="CUDA device"):
        check_trt_compat(_manifest(), TrtRuntimeInfo("10.3.0", None, None))


def test_folder_without_trt_engines_refused():
    m = _manifest()
    m.engine_backend, m.trt = "ort", None
    with pytest.raises(CatomeError, match="no TensorRT engines") as err:
        check_trt_compat(m, H100)
    assert "--engine-kind trt" in error_line(err.value)


@pytest.mark.parametrize("batch, hw, what", [
    (3, (64, 64), "batch 3"),
    (1, (16, 64), "latent_height 16"),
    (1, (64, 100), "latent_width 100"),
])
def test_shapes_outside_the_ranges_refused(batch, hw, what):
    with pytest.raises(CatomeError, match=what) as err:
        check_trt_compat(_manifest(), H100, batch=batch, latent_hw=hw)
    assert "catome-export build" in error_line(err.value)


def test_shapes_checked_against_the_trt_profile_too():
    narrower = {"sample": {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [2, 4, 80, 96]}}
    m = _manifest(profiles=(narrower,))  # narrower than the manifest's ranges
    check_shapes_in_profiles(m, 2, (80, 96))
    with pytest.raises(CatomeError, match="TensorRT profile"):
        check_shapes_in_profiles(m, 2, (88, 96))


def _flags(cmd: str) -> dict[str, str]:
    args = shlex.split(cmd)
    assert args[:2] == ["catome-export", "build"]
    return {args[i][2:]: args[i + 1] for i in range(2, len(args) - 1, 2)}


def test_rebuild_command_from_a_manifest_without_recorded_build_arguments():
    flags = _flags(rebuild_command(_manifest(), "engines/sd15 trt"))
    assert flags["model"] == "sd15" and flags["weights"] == "random"
    assert flags["engine-kind"] == "trt" and flags["precision"] == "fp16"
    assert flags["threshold"] == "0.7" and flags["schedule"] == "config3" and flags["step-base"] == "1"
    assert (flags["min-batch"], flags["max-batch"]) == ("1", "2")
    assert (flags["min-resolution"], flags["max-resolution"]) == ("256", "768")
    assert flags["opt-merge-fraction"] == "0.75"
    assert flags["out"] == "engines/sd15 trt"


def test_rebuild_command_custom_schedule():
    m = _manifest()
    m.merge = replace(m.merge, schedule=parse_schedule("0,3,9", 0))
    flags = _flags(rebuild_command(m))
    assert flags["schedule"] == "0,3,9" and flags["step-base"] == "0" and flags["out"] == "engines/sd15-trt"


def test_rebuild_command_every_flag_is_one_the_build_command_takes():
    from catome_export.cli.main import build_parser

    parser = build_parser()
    args = shlex.split(rebuild_command(_manifest(), "engines/x"))[1:]
    parsed = parser.parse_args(args)
    assert parsed.engine_kind == "trt" and parsed.min_resolution == 256 and parsed.max_batch == 2
    assert parsed.opt_merge_fraction == 0.75


def test_real_manifest_formats_its_recorded_build_with_trt():
    manifest = _manifest()
    manifest.build = BuildRecord.from_dict({"model": "sd15", "weights": "random", "precision": "fp16",
                                            "backend": "ort", "min_resolution": 256, "max_resolution": 768})
    flags = _flags(rebuild_command(manifest, "engines/here"))
    assert flags["engine-kind"] == "trt" and flags["out"] == "engines/here" and flags["min-resolution"] == "256"
    check_trt_compat(manifest, H100)
    with pytest.raises(CatomeError) as err:
        check_trt_compat(manifest, TrtRuntimeInfo("10.3.1", H100.gpu_name, "9.0"))
    assert "--engine-kind trt" in error_line(err.value)


def test_shape_error_suggests_ranges_that_cover_the_request():
    with pytest.raises(CatomeError) as err:
        check_shapes_in_profiles(_manifest(), 4, (128, 64))
    flags = _flags(error_line(err.value).split("wider ranges: ")[1])
    assert flags["max-batch"] == "4" and flags["max-resolution"] == "1024" and flags["min-resolution"] == "256"


def test_detect_never_raises():
    info = TrtRuntimeInfo.detect()
    assert info.tensorrt_version is None or isinstance(info.tensorrt_version, str)
