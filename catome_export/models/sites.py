"""Merge sites: the transformer blocks at the U-Net's highest-resolution levels.

A site is a diffusers ``BasicTransformerBlock`` whose resolution level has a
downsample factor <= ``max_downsample``. For SD 1.x/2.x (merge level 1, the
full latent resolution, N = (H/8) * (W/8)) that is down_blocks.0 (2 blocks)
and up_blocks.3 (3 blocks): 5 sites. SDXL has no attention at its top level;
at its merge level 2 (N = (H/16) * (W/16)) each Transformer2DModel of
down_blocks.1 (2) and up_blocks.1 (3) holds 2 blocks: 10 sites, several per
Transformer2DModel. Sites are listed in execution order (down blocks, mid
block, up blocks; within a Transformer2DModel, block by block). A linear or
convolutional ``proj_in`` makes no difference: sites are the blocks, which
see [B, N, C] tokens either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from catome_export.errors import CatomeError


@dataclass(frozen=True)
class MergeSite:
    index: int
    """Position in execution order, 0-based."""
    path: str
    """Module path of the BasicTransformerBlock, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0``."""
    downsample: int
    """Downsample factor of the block's level relative to the latent (1 = full resolution)."""
    channels: int | None = field(default=None, compare=False)
    """Width of the block's tokens (recorded by a build; None where not known)."""

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) of this site for a latent of ``latent_hw``."""
        lh, lw = latent_hw
        return -(-lh // self.downsample), -(-lw // self.downsample)


def _order_key(path: str, num_down: int) -> tuple[int, int, int, int]:
    nums = [int(n) for n in re.findall(r"\d+", path)]
    if path.startswith("down_blocks."):
        return (0, *nums[:3])
    if path.startswith("mid_block."):
        return (1, 0, *nums[:2])
    return (2, *nums[:3])


def block_downsample(path: str, num_down: int, num_up: int) -> int:
    """Downsample factor of the level a block at ``path`` runs at."""
    if path.startswith("down_blocks."):
        return 2 ** int(path.split(".")[1])
    if path.startswith("mid_block."):
        return 2 ** (num_down - 1)
    if path.startswith("up_blocks."):
        return 2 ** (num_up - 1 - int(path.split(".")[1]))
    raise CatomeError(f"cannot place transformer block {path!r} in the U-Net's levels")


def find_merge_sites(unet: torch.nn.Module, max_downsample: int = 1) -> list[MergeSite]:
    """The merge sites of a diffusers ``UNet2DConditionModel``, in execution order."""
    if isinstance(max_downsample, bool) or max_downsample not in (1, 2, 4, 8):
        raise CatomeError(f"max_downsample must be 1, 2, 4 or 8, got {max_downsample!r}")
    down, up = _levels(unet)
    placed = [(path, block_downsample(path, len(down), len(up))) for path in _block_paths(unet)]
    if not placed:
        raise CatomeError(f"the {type(unet).__name__} has no transformer blocks (BasicTransformerBlock): "
                          "token merging has nothing to act on; use a Stable Diffusion U-Net")
    chosen = sorted(((path, ds) for path, ds in placed if ds <= max_downsample),
                    key=lambda item: _order_key(item[0], len(down)))
    if not chosen:
        top = min(ds for _, ds in placed)
        raise CatomeError(
            f"the U-Net has no transformer block at downsample <= {max_downsample}, so nothing would be merged: "
            f"its highest-resolution attention is at downsample {top} (SDXL's layout): use max_downsample={top}, "
            "or leave it unset for the model's default")
    return [MergeSite(i, path, ds) for i, (path, ds) in enumerate(chosen)]


def default_merge_level(unet: torch.nn.Module) -> int:
    """The downsample factor of the U-Net's highest-resolution transformer blocks: its natural merge level.

    1 for SD 1.x/2.x, 2 for SDXL; what ``max_downsample=None`` means in the
    eager API, and the value of each model's registry entry.
    """
    down, up = _levels(unet)
    levels = [block_downsample(path, len(down), len(up)) for path in _block_paths(unet)]
    if not levels:
        raise CatomeError(f"the {type(unet).__name__} has no transformer blocks (BasicTransformerBlock): "
                          "token merging has nothing to act on; use a Stable Diffusion U-Net")
    return min(levels)


def _levels(unet: torch.nn.Module) -> tuple[Any, Any]:
    down = getattr(unet, "down_blocks", None)
    up = getattr(unet, "up_blocks", None)
    if down is None or up is None:
        raise CatomeError(
            f"the model is a {type(unet).__name__}, not a diffusers UNet2DConditionModel (no down_blocks/up_blocks): "
            "token merging here follows the U-Net's resolution levels (SD 1.x, 2.x, SDXL); transformer-based "
            "models (SD3, PixArt, Flux) are not supported")
    return down, up


def _block_paths(unet: torch.nn.Module) -> list[str]:
    from diffusers.models.attention import BasicTransformerBlock

    return [name for name, mod in unet.named_modules() if isinstance(mod, BasicTransformerBlock)]
