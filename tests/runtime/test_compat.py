"""TensorRT / GPU compatibility of an engine folder, with the machine's side injected (no TensorRT needed)."""

from __future__ import annotations

import copy
import shlex

import pytest

from catome_export.errors import CatomeError
from catome_export.runtime.compat import (
    TrtRuntimeInfo, check_shapes_in_profiles, check_trt_compat, rebuild_command,
)

H100 = TrtRuntimeInfo("10.3.0", "NVIDIA H100 80GB HBM3", "9.0")


def _manifest(**trt_overrides) -> dict:
    trt = {"version": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
           "plugins": ["ScatterElements(reduction=add)"], "opt_merge_fraction": 0.75,
           "profiles": [{"sample": {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [2, 4, 96, 96]}}]}
    trt.update(trt_overrides)
    return {
        "format_version": 1, "name": "sd15-trt",
        "model": {"id": "sd15", "weights": "random", "weights_hash": "0" * 64},
        "precision": "fp16",
        "merge": {"threshold": 0.7, "ratio": None, "merge_fraction": None,
                  "schedule": {"name": "config3", "checkpoints": [0, 8], "step_base": 1},
                  "max_downsample": 1, "stride": [2, 2]},
        "shapes": {"batch": [1, 2], "latent_height": [32, 96], "latent_width": [32, 96], "text_len": 77,
                   "opt": {"batch": 2, "latent_height": 64, "latent_width": 64, "merge_fraction": 0.75}},
        "engine_backend": "trt",
        "trt": trt,
    }


class AttrManifest:
    """A manifest with attributes (like the Manifest dataclass) instead of keys."""

    def __init__(self, data: dict) -> None:
        for k, v in data.items():
            setattr(self, k, v)


@pytest.mark.parametrize("wrap", [dict, AttrManifest], ids=["dict", "attrs"])
def test_same_machine_passes(wrap):
    check_trt_compat(wrap(_manifest()), H100)
    check_trt_compat(wrap(_manifest()), H100, batch=2, latent_hw=(64, 96))


def test_patch_release_difference_is_fine():
    check_trt_compat(_manifest(), TrtRuntimeInfo("10.3.1.post2", H100.gpu_name, "9.0"))


@pytest.mark.parametrize("here", ["10.4.0", "11.3.0", "9.3.0"])
def test_other_tensorrt_minor_or_major_refused(here):
    with pytest.raises(CatomeError) as err:
        check_trt_compat(_manifest(), TrtRuntimeInfo(here, H100.gpu_name, "9.0"))
    msg = str(err.value)
    assert "10.3.0" in msg and here in msg and "major.minor" in msg
    assert "catome-export build --model sd15" in msg and "--backend trt" in msg


def test_version_compatible_build_accepts_other_version():
    check_trt_compat(_manifest(version_compatible=True), TrtRuntimeInfo("10.5.0", H100.gpu_name, "9.0"))


def test_other_compute_capability_refused():
    with pytest.raises(CatomeError, match=r"compute capability 9\.0.*8\.9") as err:
        check_trt_compat(_manifest(), TrtRuntimeInfo("10.3.0", "NVIDIA L40S", "8.9"))
    assert "--backend trt" in str(err.value)


def test_other_gpu_model_same_capability_refused():
    with pytest.raises(CatomeError, match="NVIDIA H100 PCIe") as err:
        check_trt_compat(_manifest(), TrtRuntimeInfo("10.3.0", "NVIDIA H100 PCIe", "9.0"))
    assert "rebuild" in str(err.value).lower()


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
    m["engine_backend"], m["trt"] = "ort", None
    with pytest.raises(CatomeError, match="no TensorRT engines") as err:
        check_trt_compat(m, H100)
    assert "--backend trt" in str(err.value)


@pytest.mark.parametrize("batch, hw, what", [
    (3, (64, 64), "batch 3"),
    (1, (16, 64), "latent_height 16"),
    (1, (64, 100), "latent_width 100"),
])
def test_shapes_outside_the_ranges_refused(batch, hw, what):
    with pytest.raises(CatomeError, match=what) as err:
        check_trt_compat(_manifest(), H100, batch=batch, latent_hw=hw)
    assert "catome-export build" in str(err.value)


def test_shapes_checked_against_the_trt_profile_too():
    m = _manifest()
    m["trt"]["profiles"][0]["sample"]["max"] = [2, 4, 80, 96]  # narrower than the manifest's ranges
    check_shapes_in_profiles(m, 2, (80, 96))
    with pytest.raises(CatomeError, match="TensorRT profile"):
        check_shapes_in_profiles(m, 2, (88, 96))


def test_rebuild_command_round_trips_the_build_settings():
    cmd = rebuild_command(_manifest(), "engines/sd15 trt")
    args = shlex.split(cmd)
    assert args[:2] == ["catome-export", "build"]

    def value(flag):
        return args[args.index(flag) + 1]

    assert value("--model") == "sd15" and value("--weights") == "random"
    assert value("--backend") == "trt" and value("--precision") == "fp16"
    assert value("--threshold") == "0.7" and value("--schedule") == "config3"
    assert value("--batch") == "1-2"
    assert value("--height") == "256-768" and value("--width") == "256-768"
    assert value("--opt-merge-fraction") == "0.75"
    assert value("--out") == "engines/sd15 trt"


def test_rebuild_command_custom_schedule_and_ratio():
    m = copy.deepcopy(_manifest())
    m["merge"].update(threshold=None, ratio=0.5, schedule={"name": "custom", "checkpoints": [0, 3, 9], "step_base": 0})
    args = shlex.split(rebuild_command(m))
    assert args[args.index("--ratio") + 1] == "0.5"
    assert args[args.index("--schedule") + 1] == "0,3,9"
    assert args[args.index("--step-base") + 1] == "0"
    assert args[args.index("--out") + 1] == "engines/sd15-trt"


def test_detect_never_raises():
    info = TrtRuntimeInfo.detect()
    assert info.tensorrt_version is None or isinstance(info.tensorrt_version, str)
