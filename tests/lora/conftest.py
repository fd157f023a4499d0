"""LoRA files made with PEFT on the tiny U-Net (seeded, non-zero weights), saved in diffusers format.

``make_lora(path, seed=..., targets=..., rank=..., alpha=...)`` writes
``path`` (a .safetensors file) as ``StableDiffusionPipeline.save_lora_weights``
does, from ``get_peft_model_state_dict`` + ``convert_state_dict_to_diffusers``
of a PEFT adapter on the tiny U-Net whose A and B matrices are random
(``init_lora_weights=False`` randomises B too, which PEFT's default leaves zero).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pytest
import torch

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def write_lora(path: Path, *, seed: int = 1, targets: tuple[str, ...] = ATTENTION, rank: int = 4,
               alpha: float = 8.0, model: str = "tiny", spread: float = 1.0) -> Path:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from catome_export.models import load_unet

    unet = load_unet(model, weights="random")
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    unet.add_adapter(config)
    if spread != 1.0:
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_" in name:
                    p.mul_(spread)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    folder = Path(tempfile.mkdtemp(prefix="lora-"))
    try:
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers,
                                                  unet_lora_adapter_metadata=config.to_dict())
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder / "pytorch_lora_weights.safetensors"), path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


@pytest.fixture(scope="session")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRAs of the tiny U-Net's attention projections (``a``: rank 4, ``b``: rank 2, other seed) and one
    of its feed-forward and convolution layers (``ffconv``)."""
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": write_lora(root / "a.safetensors", seed=1),
        "b": write_lora(root / "b.safetensors", seed=2, rank=2, alpha=2.0),
        "ffconv": write_lora(root / "ffconv.safetensors", seed=3, targets=("ff.net.2", "proj_in", "conv1")),
    }


@pytest.fixture(scope="session")
def make_lora() -> Callable[..., Path]:
    pytest.importorskip("peft")
    return write_lora
