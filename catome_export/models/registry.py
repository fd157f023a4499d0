"""Model registry: ``sd15`` (hub id or local folder), ``tiny`` (bundled config), or a path.

``weights="pretrained"`` loads real weights (hub download or a local diffusers
folder); ``weights="random"`` builds the architecture from its config with
seeded weights, identical in every process, for tests and speed work.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from catome_export.choices import Weights
from catome_export.errors import CatomeError

logger = logging.getLogger(__name__)

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
"""The community mirror of the SD 1.5 weights on the Hugging Face hub."""

RANDOM_SEED = 0
"""Seed of ``weights="random"``."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    """Registry name (``tiny``, ``sd15``) or the folder path."""
    source: str
    """Hub id or local path weights come from (``bundled`` for tiny)."""
    default_resolution: int
    """Default image resolution in pixels (latent * 8)."""
    text_dim: int
    """Width of the text embeddings the U-Net cross-attends to."""
    text_len: int = 77
    """Token count of the text embeddings."""


MODELS: dict[str, ModelInfo] = {
    "tiny": ModelInfo("tiny", "bundled", default_resolution=256, text_dim=32),
    "sd15": ModelInfo("sd15", SD15_HUB_ID, default_resolution=512, text_dim=768),
}


def bundled_config(name: str) -> dict[str, Any]:
    """The bundled U-Net config of ``tiny`` or ``sd15``."""
    if name not in MODELS:
        raise CatomeError(f"no bundled config for {name!r}: known models are {', '.join(MODELS)}")
    text = resources.files("catome_export.models").joinpath("configs", f"{name}_unet.json").read_text()
    return json.loads(text)


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    from catome_export.dtypes import precision_dtype

    return precision_dtype(dtype)


def random_unet(config: dict[str, Any], seed: int = RANDOM_SEED):
    """A UNet2DConditionModel from ``config`` with seeded weights (same in every process)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(config)
    return unet


def model_info(name_or_path: str) -> ModelInfo:
    """Registry entry of a name, or an entry describing a local diffusers folder."""
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    path = Path(name_or_path)
    cfg = _local_unet_config(path)
    return ModelInfo(str(path), str(path), default_resolution=int(cfg.get("sample_size", 64)) * 8,
                     text_dim=int(cfg.get("cross_attention_dim", 768)))


def _local_unet_dir(path: Path) -> Path:
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    if (path / "config.json").is_file():
        return path
    raise CatomeError(
        f"unknown model {str(path)!r}: use 'tiny', 'sd15', or a local diffusers folder "
        "(a pipeline folder with unet/config.json, or a U-Net folder with config.json)"
    )


def _local_unet_config(path: Path) -> dict[str, Any]:
    folder = _local_unet_dir(path)
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CatomeError(f"cannot read {folder / 'config.json'}: {exc}") from None


def load_unet(name_or_path: str, weights: str = "pretrained", dtype: torch.dtype | str = torch.float32):
    """Load a diffusers ``UNet2DConditionModel`` in eval mode.

    ``tiny``: bundled config; only random weights exist, so ``pretrained`` is
    taken as random. ``sd15``: the hub mirror (or the local cache), or the
    bundled SD 1.5 config with ``weights="random"``. A path: a local diffusers
    folder (pipeline or U-Net); ``weights="random"`` uses its config only.
    """
    if weights not in Weights.values():
        raise CatomeError(f"weights must be 'pretrained' or 'random', got {weights!r}")
    torch_dtype = _parse_dtype(dtype)
    if name_or_path == "tiny":
        unet = random_unet(bundled_config("tiny"))
    elif name_or_path == "sd15":
        unet = random_unet(bundled_config("sd15")) if weights == "random" else _from_hub(SD15_HUB_ID)
    else:
        path = Path(name_or_path)
        if weights == "random":
            unet = random_unet(_local_unet_config(path))
        else:
            unet = _from_local(_local_unet_dir(path))
    if unet.dtype != torch_dtype:
        unet = unet.to(dtype=torch_dtype)
    return unet.eval().requires_grad_(False)


def _from_hub(hub_id: str):
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_pretrained(hub_id, subfolder="unet")
    except Exception as exc:  # hub and cache errors come in many types
        raise CatomeError(
            f"cannot load pretrained weights of {hub_id!r} ({type(exc).__name__}). Offline or without access, "
            "use --weights random (same architecture, seeded weights) or pass a local diffusers folder as the model"
        ) from None


def _from_local(folder: Path):
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_pretrained(str(folder))
    except Exception as exc:
        raise CatomeError(
            f"cannot load the U-Net weights in {folder} ({type(exc).__name__}: {exc}). "
            "Check the folder, or use --weights random to build its architecture with seeded weights"
        ) from None


def weights_hash(unet: torch.nn.Module) -> str:
    """sha256 over the U-Net's parameters and buffers (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
