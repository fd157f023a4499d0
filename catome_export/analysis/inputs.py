"""Seeded inputs of a pair-tracking run: start latents and text embeddings.

Start latents (``noise`` or ``smooth``) come from :mod:`catome_export.latents`;
smooth latents are the default with random weights, where white noise gives
almost no pairs above t = 0.7.

Random text embeddings (uncond and cond, seeded, the model's text width) stand
in for a text encoder where there is none (``tiny``, random weights).
"""

from __future__ import annotations

import torch

from catome_export.errors import CatomeError
from catome_export.latents import LATENT_KINDS, make_latents

__all__ = ["LATENT_KINDS", "make_latents", "random_text_embeddings"]


def random_text_embeddings(
    text_dim: int, text_len: int, seed: int, *,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Seeded stand-in text embeddings [2, L, D]: row 0 unconditional, row 1 conditional."""
    if text_dim < 1 or text_len < 1:
        raise CatomeError(f"text embeddings need a width and length >= 1, got {text_dim} x {text_len}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    emb = torch.randn(2, text_len, text_dim, generator=gen, dtype=torch.float32)
    return emb.to(device=device, dtype=dtype)
