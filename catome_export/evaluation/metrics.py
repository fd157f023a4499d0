"""Image quality metrics against a reference image: PSNR and SSIM.

Both take images as arrays or tensors with values in ``[0, data_range]``,
laid out ``[H, W]``, ``[H, W, C]`` (numpy / PIL order) or ``[C, H, W]``
(torch order, chosen when the first dimension is 1 or 3 and the last is not).

SSIM follows Wang et al. (2004), "Image quality assessment: from error
visibility to structural similarity": local means, variances and covariance
under an 11x11 Gaussian window with sigma 1.5, constants ``C1 = (0.01 L)^2``
and ``C2 = (0.03 L)^2``, the SSIM map evaluated where the window fits inside
the image ("valid" positions) and averaged; colour images average the
per-channel values. Images smaller than the window use the largest odd window
that fits (same sigma).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from catome_export.checks import check_float
from catome_export.errors import CatomeError

SSIM_WINDOW = 11
"""Side of the Gaussian window."""
SSIM_SIGMA = 1.5
"""Standard deviation of the Gaussian window, in pixels."""
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_chw(image: Any, name: str) -> torch.Tensor:
    """A float64 ``[C, H, W]`` tensor of an ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` image."""
    if isinstance(image, torch.Tensor):
        t = image.detach().to("cpu", torch.float64)
    else:
        try:
            t = torch.from_numpy(np.asarray(image, dtype=np.float64).copy())
        except (TypeError, ValueError):
            raise CatomeError(f"{name} must be an image array or tensor, got {type(image).__name__}") from None
    if t.ndim == 2:
        return t.unsqueeze(0)
    if t.ndim != 3:
        raise CatomeError(f"{name} must be [H, W], [H, W, C] or [C, H, W], got shape {tuple(t.shape)}")
    if t.shape[-1] in (1, 3, 4):
        return t.permute(2, 0, 1).contiguous()
    if t.shape[0] in (1, 3, 4):
        return t
    raise CatomeError(f"{name} has shape {tuple(t.shape)}: cannot tell its channel axis (use 1, 3 or 4 channels)")


def _pair(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_chw(a, "image"), _as_chw(b, "reference")
    if x.shape != y.shape:
        raise CatomeError(f"the images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)} ([C, H, W])")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise CatomeError("the images contain NaN or infinite values")
    return x, y


def _check_range(data_range: float) -> float:
    return check_float("data_range", data_range, 0, lo_open=True, finite=False,
                       hint="1.0 for [0, 1] images, 255 for uint8")


def psnr(image: Any, reference: Any, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(L^2 / MSE)``; ``inf`` for identical images."""
    rng = _check_range(data_range)
    x, y = _pair(image, reference)
    mse = float(torch.mean((x - y) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(rng * rng / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """A normalised ``[size, size]`` float64 Gaussian window (sums to 1)."""
    if size < 1 or size % 2 == 0:
        raise CatomeError(f"the SSIM window size must be a positive odd number, got {size}")
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma * sigma))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_map(image: Any, reference: Any, data_range: float = 1.0, window_size: int = SSIM_WINDOW,
             sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The local SSIM values ``[C, H - w + 1, W - w + 1]`` (valid window positions)."""
    rng = _check_range(data_range)
    x, y = _pair(image, reference)
    side = min(window_size, x.shape[-2], x.shape[-1])
    side = side if side % 2 == 1 else side - 1
    window = gaussian_window(side, sigma)
    channels = x.shape[0]
    kernel = window.expand(channels, 1, side, side)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t.unsqueeze(0), kernel, groups=channels).squeeze(0)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1 = (SSIM_K1 * rng) ** 2
    c2 = (SSIM_K2 * rng) ** 2
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return num / den


def ssim(image: Any, reference: Any, data_range: float = 1.0, window_size: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> float:
    """Mean structural similarity (1.0 for identical images); colour channels are averaged."""
    return float(ssim_map(image, reference, data_range, window_size, sigma).mean())
