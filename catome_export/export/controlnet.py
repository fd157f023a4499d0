"""ControlNet residual inputs of an engine built with ``--controlnet``: which they are, their shapes, seeded values.

An engine built with ``build --controlnet`` takes diffusers'
``down_block_additional_residuals`` as the graph inputs ``controlnet_down{i}``
(one per skip tensor of the down path: 12 for SD 1.x/2.x, 9 for SDXL; the
count comes from the U-Net, never from a constant) and
``mid_block_additional_residual`` as ``controlnet_mid``. They are added where
``UNet2DConditionModel.forward`` adds them (see
:mod:`catome_export.export.unet_steps`), so each is an input of the stage
that consumes its sum. Which inputs they are, and the manifest's record of them, is
:mod:`catome_export.engine.controlnet`; this module makes seeded values for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from catome_export.engine.controlnet import ControlNetInputs
from catome_export.engine.io_names import CONTROLNET_MID, controlnet_down_name

RESIDUAL_SCALE = 0.5
"""Scale of the seeded residuals :func:`random_residuals` makes (verify, the build's examples, the bench): of the
order of the hidden states they are added to, so a wrong addition shows."""


def random_residuals(inputs: ControlNetInputs, batch: int, latent_hw: tuple[int, int], *, seed: int = 0,
                     scale: float = RESIDUAL_SCALE, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], torch.Tensor]:
    """Seeded ControlNet residuals of the engine's shapes: (``down_block_additional_residuals``,
    ``mid_block_additional_residual``), the same on every machine (drawn on the CPU, then moved)."""
    gen = torch.Generator().manual_seed(seed)
    down_shapes, mid_shape = inputs.shapes(batch, latent_hw)
    down = [(torch.randn(s, generator=gen) * scale).to(device=device, dtype=dtype) for s in down_shapes]
    mid = (torch.randn(mid_shape, generator=gen) * scale).to(device=device, dtype=dtype)
    return down, mid


def residual_feeds(down: Sequence[torch.Tensor], mid: torch.Tensor) -> dict[str, torch.Tensor]:
    """The graph inputs (name -> tensor) of diffusers-style residuals."""
    feeds = {controlnet_down_name(i): t for i, t in enumerate(down)}
    feeds[CONTROLNET_MID] = mid
    return feeds
