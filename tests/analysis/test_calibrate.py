"""auto:K schedules: calibration on the tiny U-Net and spec resolution."""

from __future__ import annotations

import pytest
import torch

import catome_export.analysis.calibrate as calibrate_mod
from catome_export.analysis.calibrate import (
    calibrate_schedule,
    calibration_analysis,
    is_auto_schedule,
    parse_auto_spec,
    resolve_schedule,
)
from catome_export.errors import CatomeError
from catome_export.merging import Schedule, parse_schedule
from catome_export.models import find_merge_sites

HW = (16, 16)
STEPS = 6
CALIB = dict(steps=STEPS, latent_hw=HW, latents="smooth")


@pytest.fixture(scope="module")
def auto3(tiny_unet: torch.nn.Module) -> Schedule:
    return calibrate_schedule(tiny_unet, 3, step_base=1, **CALIB)


def test_auto_k_has_k_checkpoints_with_the_first_step(auto3: Schedule, tiny_unet: torch.nn.Module) -> None:
    assert auto3.name == "auto:3" and auto3.step_base == 1
    assert len(auto3.checkpoints) == 3
    assert auto3.checkpoints[0] == 1  # step_base 1: loop index 0 is step 1
    assert list(auto3.checkpoints) == sorted(set(auto3.checkpoints))
    assert all(1 <= c <= STEPS + 1 for c in auto3.checkpoints)  # PLMS: STEPS + 1 U-Net calls
    fires = [i for i in range(STEPS + 1) if auto3.is_checkpoint(i)]
    assert len(fires) == 3 and fires[0] == 0
    modules = dict(tiny_unet.named_modules())
    assert all(not modules[s.path]._forward_pre_hooks for s in find_merge_sites(tiny_unet))


def test_calibration_is_the_analysis_optimum(auto3: Schedule, tiny_unet: torch.nn.Module) -> None:
    analysis = calibration_analysis(tiny_unet, **CALIB)
    score = analysis.propose(3, 1)
    assert score.checkpoints == auto3.checkpoints
    # no other 3-checkpoint list does better on the same run
    assert score.drift <= analysis.uniform(3, 1).drift + 1e-12
    assert score.drift <= analysis.evaluate(Schedule("x", (1, 3, 5), 1)).drift + 1e-12


def test_step_base_zero_numbers_loop_indices(auto3: Schedule, tiny_unet: torch.nn.Module) -> None:
    base0 = calibrate_schedule(tiny_unet, 3, step_base=0, **CALIB)
    assert base0.checkpoints[0] == 0
    assert base0.checkpoints == tuple(c - 1 for c in auto3.checkpoints)


def test_resolve_schedule(tiny_unet: torch.nn.Module) -> None:
    assert resolve_schedule("config3", None, 0) == parse_schedule("config3", 0)
    assert resolve_schedule([0, 5], None) == parse_schedule([0, 5])
    sched = resolve_schedule("AUTO:2", tiny_unet, 1, steps=3, latent_hw=(8, 8), latents="smooth")
    assert sched.name == "auto:2" and len(sched.checkpoints) == 2 and sched.checkpoints[0] == 1


@pytest.mark.parametrize("spec", ["auto:0", "auto:-1", "auto:x", "auto:", "auto:2.5"])
def test_malformed_auto_specs(spec: str, tiny_unet: torch.nn.Module) -> None:
    with pytest.raises(CatomeError, match="auto:K"):
        resolve_schedule(spec, tiny_unet, 1, **CALIB)


def test_auto_k_limits_and_misuse(tiny_unet: torch.nn.Module) -> None:
    with pytest.raises(CatomeError, match="from 1 to 6"):
        resolve_schedule("auto:7", tiny_unet, 1, **CALIB)
    with pytest.raises(CatomeError, match="pass the U-Net"):
        resolve_schedule("auto:3", None)
    with pytest.raises(CatomeError, match="unknown calibration option"):
        resolve_schedule("auto:3", tiny_unet, 1, step=3)
    with pytest.raises(CatomeError):
        calibrate_schedule(tiny_unet, True, **CALIB)
    with pytest.raises(CatomeError):
        calibrate_schedule(tiny_unet, 2, step_base=2, **CALIB)
    with pytest.raises(CatomeError):
        calibration_analysis(tiny_unet, steps=2, latent_hw=HW, latents="stripes")
    with pytest.raises(CatomeError, match="threshold"):
        calibrate_schedule(tiny_unet, 2, steps=2, latent_hw=HW, threshold=None)


def test_spec_helpers() -> None:
    assert parse_auto_spec("auto:13") == 13 and parse_auto_spec(" Auto:4 ") == 4
    assert parse_auto_spec("config3") is None and parse_auto_spec([0, 1]) is None
    assert is_auto_schedule("auto:4") and not is_auto_schedule("config3")


def test_auto_latents_fall_back_to_smooth(tiny_unet: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    kw = dict(steps=1, latent_hw=HW, latents="auto")
    assert calibration_analysis(tiny_unet, **kw).config.latents == "noise"
    monkeypatch.setattr(calibrate_mod, "MIN_MERGED_FRACTION", 1.01)  # no run merges every token
    assert calibration_analysis(tiny_unet, **kw).config.latents == "smooth"
