"""An offline Stable Diffusion pipeline around the tiny U-Net, for tests and quick runs.

Everything is built from small configs with seeded random weights, so no
download is needed: the bundled ``tiny`` U-Net (SD 1.5 layout), a small
``AutoencoderKL`` with the SD downsample factor 8, a small random
``CLIPTextModel`` and a character-level ``CLIPTokenizer`` whose vocabulary is
generated in memory (every byte as a token, no merges). Prompts therefore
work, but their embeddings carry no meaning: the images are noise-shaped.
``prompt_embeds=`` / ``negative_prompt_embeds=`` ([B, 77, 32]) work as well.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from catome_export.errors import CatomeError
from catome_export.models.registry import MODELS, RANDOM_SEED, load_unet

logger = logging.getLogger(__name__)

SCHEDULERS = ("pndm", "ddim", "euler")
"""Schedulers :func:`tiny_pipeline` can use (pndm = PLMS as SD 1.5 ships)."""

_SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
"""The noise schedule of SD 1.5's scheduler config."""


def make_scheduler(name: str = "pndm") -> Any:
    """A diffusers scheduler with SD 1.5's noise schedule: ``pndm`` (PLMS), ``ddim`` or ``euler``."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    key = str(name).lower()
    if key == "pndm":
        return PNDMScheduler(**_SD_SCHEDULER_CONFIG, skip_prk_steps=True, set_alpha_to_one=False)
    if key == "ddim":
        return DDIMScheduler(**_SD_SCHEDULER_CONFIG, clip_sample=False, set_alpha_to_one=False)
    if key == "euler":
        return EulerDiscreteScheduler(**_SD_SCHEDULER_CONFIG)
    raise CatomeError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")


def _byte_alphabet() -> list[str]:
    """The 256 characters byte-level BPE uses for the bytes 0..255 (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


def tiny_tokenizer(max_length: int = 77) -> Any:
    """A character-level ``CLIPTokenizer`` built in memory (514 tokens: bytes, word-final bytes, bos, eos)."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    try:
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    except TypeError as exc:  # older transformers want vocab/merges files
        raise CatomeError(f"this transformers version cannot build a tokenizer in memory ({exc}): "
                          "call the pipeline with prompt_embeds= instead of prompts") from None


def tiny_text_encoder(vocab_size: int, hidden_size: int, seed: int = RANDOM_SEED, max_length: int = 77) -> Any:
    """A 2-layer ``CLIPTextModel`` with seeded random weights and ``hidden_size`` outputs."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(config).eval().requires_grad_(False)


def tiny_vae(seed: int = RANDOM_SEED) -> Any:
    """A small ``AutoencoderKL`` (4 levels: image / 8 = latent, as SD) with seeded random weights."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=256,
            scaling_factor=0.18215,
        )
    return vae.eval().requires_grad_(False)


def tiny_pipeline(scheduler: str = "pndm", seed: int = RANDOM_SEED, unet: torch.nn.Module | None = None,
                  with_text_encoder: bool = True) -> Any:
    """An offline ``StableDiffusionPipeline`` around the tiny U-Net (or ``unet``), all weights seeded.

    ``scheduler``: ``pndm`` (PLMS with skip_prk_steps, as SD 1.5), ``ddim`` or
    ``euler``. ``with_text_encoder=False`` leaves out the tokenizer and text
    encoder: call it with ``prompt_embeds=`` and ``negative_prompt_embeds=``.
    No safety checker. Default size 256x256 (latent 32x32); use
    ``height``/``width`` multiples of 8.
    """
    from diffusers import StableDiffusionPipeline

    sched = make_scheduler(scheduler)
    unet = load_unet("tiny", "random") if unet is None else unet
    text_dim = int(getattr(unet.config, "cross_attention_dim", MODELS["tiny"].text_dim))
    tokenizer = text_encoder = None
    if with_text_encoder:
        tokenizer = tiny_tokenizer()
        text_encoder = tiny_text_encoder(len(tokenizer), text_dim, seed)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
