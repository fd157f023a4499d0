"""Seeded start latents: plain Gaussian ``noise``, as a pipeline starts from, or ``smooth`` latents.

``smooth`` latents are the same seeded noise blurred with a Gaussian kernel
and rescaled to unit variance per channel. With random weights the block
inputs are only as self-similar as the latent, and white noise gives almost
no pairs above t = 0.7, so smooth latents are what analysis, benchmarks,
calibration and verification feed a random-weight model: they give a merge
rate with room to change from step to step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from catome_export.errors import CatomeError

LATENT_KINDS = ("smooth", "noise")
"""Kinds of start latents."""

SMOOTH_SIGMA_FRACTION = 1.0 / 16.0
"""Blur width of smooth latents, as a fraction of the latent's shorter side (at least 1 latent pixel)."""


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with replicate padding."""
    k = _gaussian_kernel(sigma).to(x)
    c = x.shape[1]
    r = (k.numel() - 1) // 2
    y = F.pad(x, (r, r, 0, 0), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, r, r), mode="replicate")
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def make_latents(
    shape: tuple[int, int, int, int], kind: str, seed: int, *,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Seeded start latents [B, C, H, W] of ``kind`` ``smooth`` or ``noise`` (unit variance)."""
    if kind not in LATENT_KINDS:
        raise CatomeError(f"latents must be one of {', '.join(LATENT_KINDS)}, got {kind!r}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if kind == "smooth":
        sigma = max(1.0, min(shape[-2:]) * SMOOTH_SIGMA_FRACTION)
        x = blur(x, sigma)
        x = (x - x.mean(dim=(-2, -1), keepdim=True)) / x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return x.to(device=device, dtype=dtype)
