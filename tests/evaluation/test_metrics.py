"""PSNR and SSIM against hand-computed values and the properties that define them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.evaluation.metrics import gaussian_window, psnr, ssim, ssim_map


def _image(seed: int = 0, shape: tuple[int, ...] = (24, 20, 3)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.random(shape)
    return np.clip(smooth, 0.0, 1.0)


def test_psnr_identical_images_is_infinite():
    img = _image()
    assert psnr(img, img.copy()) == math.inf


def test_psnr_of_a_constant_offset_is_hand_computed():
    a = np.zeros((8, 8, 3))
    b = np.full((8, 8, 3), 0.1)  # MSE = 0.01 -> 10 log10(1 / 0.01) = 20 dB
    assert psnr(b, a) == pytest.approx(20.0, abs=1e-9)
    assert psnr(b * 255, a * 255, data_range=255.0) == pytest.approx(20.0, abs=1e-9)


def test_psnr_decreases_with_noise():
    img = _image()
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(img.shape)
    values = [psnr(img + s * noise, img) for s in (0.01, 0.05, 0.2)]
    assert values[0] > values[1] > values[2]


def test_ssim_identical_images_is_one():
    img = _image()
    assert ssim(img, img.copy()) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_constant_images_is_the_luminance_formula():
    # var = cov = 0, so SSIM = (2 a b + C1) / (a^2 + b^2 + C1) at every window position.
    a, b = 0.2, 0.6
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(np.full((16, 16), a), np.full((16, 16), b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_ssim_single_window_matches_weighted_statistics_by_hand():
    # An 11x11 image holds exactly one window position: SSIM is one number from Gaussian-weighted moments.
    rng = np.random.default_rng(3)
    x = rng.random((11, 11))
    y = np.clip(x + 0.2 * rng.standard_normal((11, 11)), 0, 1)
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx = (w * x * x).sum() - mx * mx
    vy = (w * y * y).sum() - my * my
    cxy = (w * x * y).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    assert ssim_map(x, y).shape == (1, 1, 1)
    assert ssim(x, y) == pytest.approx(expected, rel=1e-10)


def test_ssim_is_symmetric_bounded_and_falls_with_noise():
    img = _image(shape=(32, 32, 3))
    rng = np.random.default_rng(2)
    noisy = [np.clip(img + s * rng.standard_normal(img.shape), 0, 1) for s in (0.02, 0.1, 0.3)]
    values = [ssim(n, img) for n in noisy]
    assert values[0] > values[1] > values[2]
    assert all(-1.0 <= v <= 1.0 for v in values)
    assert ssim(img, noisy[1]) == pytest.approx(ssim(noisy[1], img), rel=1e-12)


def test_ssim_of_an_inverted_image_is_negative():
    img = _image(shape=(32, 32))
    assert ssim(1.0 - img, img) < 0


def test_layouts_and_types_give_the_same_value():
    img = _image(shape=(20, 24, 3))
    other = np.clip(img + 0.05, 0, 1)
    hwc = ssim(img, other)
    chw = ssim(torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(other).permute(2, 0, 1))
    as_uint8 = ssim((img * 255).round().astype(np.uint8), (other * 255).round().astype(np.uint8), data_range=255.0)
    assert chw == pytest.approx(hwc, rel=1e-12)
    assert as_uint8 == pytest.approx(hwc, abs=5e-3)


def test_images_smaller_than_the_window_use_a_smaller_window():
    x = _image(shape=(6, 9))
    assert ssim(x, x) == pytest.approx(1.0)
    assert ssim_map(x, np.clip(x + 0.1, 0, 1)).shape == (1, 2, 5)  # window 5x5 on 6x9


def test_gaussian_window_is_normalised_and_symmetric():
    w = gaussian_window(11, 1.5)
    assert float(w.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(w, w.T)
    assert int(w.argmax()) == 5 * 11 + 5
    with pytest.raises(CatomeError):
        gaussian_window(10)


@pytest.mark.parametrize("bad", [
    (np.zeros((8, 8, 3)), np.zeros((8, 9, 3))),
    (np.zeros((8, 8, 3)), np.full((8, 8, 3), np.nan)),
    (np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3))),
])
def test_bad_inputs_raise_catome_error(bad):
    with pytest.raises(CatomeError):
        ssim(*bad)
    with pytest.raises(CatomeError):
        psnr(*bad)


def test_bad_data_range_raises():
    with pytest.raises(CatomeError, match="data_range"):
        psnr(np.zeros((4, 4)), np.zeros((4, 4)), data_range=0)
