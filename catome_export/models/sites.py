"""Merge sites: the transformer blocks at the U-Net's highest-resolution levels.

A site is a diffusers ``BasicTransformerBlock`` whose resolution level has a
downsample factor <= ``max_downsample`` (1 by default: the full latent
resolution, where N = (H/8) * (W/8)). For the SD 1.5 layout that is
down_blocks.0 (2 blocks) and up_blocks.3 (3 blocks): 5 sites. Sites are
listed in execution order (down blocks, mid block, up blocks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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
    from diffusers.models.attention import BasicTransformerBlock

    if isinstance(max_downsample, bool) or max_downsample not in (1, 2, 4, 8):
        raise CatomeError(f"max_downsample must be 1, 2, 4 or 8, got {max_downsample!r}")
    down = getattr(unet, "down_blocks", None)
    up = getattr(unet, "up_blocks", None)
    if down is None or up is None:
        raise CatomeError("the model is not a diffusers UNet2DConditionModel (no down_blocks/up_blocks)")
    paths = [name for name, mod in unet.named_modules() if isinstance(mod, BasicTransformerBlock)]
    chosen = []
    for path in paths:
        ds = block_downsample(path, len(down), len(up))
        if ds <= max_downsample:
            chosen.append((path, ds))
    chosen.sort(key=lambda item: _order_key(item[0], len(down)))
    if not chosen:
        raise CatomeError(f"the U-Net has no transformer block at downsample <= {max_downsample}: nothing to merge")
    return [MergeSite(i, path, ds) for i, (path, ds) in enumerate(chosen)]
