"""SDXL's added conditioning (``added_cond_kwargs``) for code that calls the U-Net itself.

A U-Net whose config says ``addition_embed_type: text_time`` (SDXL) needs,
besides the text encoding, ``text_embeds`` [B, D] (the second text
encoder's pooled output) and ``time_ids`` [B, 6]: original size (h, w), crop
top-left (y, x) and target size (h, w) in pixels, as
``StableDiffusionXLPipeline`` builds them. Analysis runs and tests without a
text encoder use seeded random ``text_embeds`` and the time ids of an
uncropped image at the generated size.
"""

from __future__ import annotations

from typing import Any

import torch

from catome_export.models.registry import added_conditioning_dims

__all__ = ["conditioning_for_config", "needs_added_conditioning", "random_added_conditioning"]


def needs_added_conditioning(unet: torch.nn.Module) -> bool:
    """True when the U-Net's forward needs ``added_cond_kwargs`` (``text_embeds``, ``time_ids``)."""
    return added_conditioning_dims(getattr(unet, "config", {})) is not None


def random_added_conditioning(unet: torch.nn.Module, batch: int, image_hw: tuple[int, int], seed: int = 0,
                              device: torch.device | str | None = None,
                              dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor] | None:
    """``added_cond_kwargs`` for ``batch`` rows: seeded random ``text_embeds``, uncropped ``time_ids``.

    None for a U-Net without added conditioning (SD 1.x/2.x). The same seed
    gives the same tensors in every process.
    """
    return conditioning_for_config(getattr(unet, "config", {}), batch, image_hw, seed, device, dtype)


def conditioning_for_config(config: Any, batch: int, image_hw: tuple[int, int], seed: int = 0,
                            device: torch.device | str | None = None,
                            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor] | None:
    """:func:`random_added_conditioning` from a U-Net config (a dict or a diffusers FrozenDict)."""
    dims = added_conditioning_dims(config)
    if dims is None:
        return None
    text_dim, n_ids = dims
    h, w = int(image_hw[0]), int(image_hw[1])
    gen = torch.Generator().manual_seed(seed)
    text_embeds = torch.randn(batch, text_dim, generator=gen)
    ids = torch.tensor([h, w, 0, 0, h, w][:n_ids], dtype=torch.float32).expand(batch, n_ids)
    return {"text_embeds": text_embeds.to(device=device, dtype=dtype),
            "time_ids": ids.to(device=device, dtype=dtype).contiguous()}
