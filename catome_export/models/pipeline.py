"""Offline Stable Diffusion pipelines around the tiny U-Nets, for tests and quick runs.

:func:`tiny_pipeline` is a ``StableDiffusionPipeline`` around ``tiny`` (SD 1.5
layout; give it another U-Net and scheduler for SD 2.x layouts);
:func:`tiny_xl_pipeline` a ``StableDiffusionXLPipeline`` around ``tiny-xl``
(SDXL's layout), with SDXL's two text encoders (the second with a
projection, whose pooled output is ``text_embeds``) and two tokenizers.

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


def make_scheduler(name: str = "pndm", prediction_type: str = "epsilon") -> Any:
    """A diffusers scheduler with SD 1.5's noise schedule: ``pndm`` (PLMS), ``ddim`` or ``euler``.

    SD 2.x and SDXL share that schedule; ``prediction_type="v_prediction"``
    makes it SD 2.x 768's (its DDIM with v-prediction), ``euler`` is what
    SDXL base ships.
    """
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    if prediction_type not in ("epsilon", "v_prediction"):
        raise CatomeError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
    config = {**_SD_SCHEDULER_CONFIG, "prediction_type": prediction_type}
    key = str(name).lower()
    if key == "pndm":
        return PNDMScheduler(**config, skip_prk_steps=True, set_alpha_to_one=False)
    if key == "ddim":
        return DDIMScheduler(**config, clip_sample=False, set_alpha_to_one=False)
    if key == "euler":
        return EulerDiscreteScheduler(**config)
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


def tiny_text_encoder(vocab_size: int, hidden_size: int, seed: int = RANDOM_SEED, max_length: int = 77,
                      projection_dim: int | None = None) -> Any:
    """A 2-layer ``CLIPTextModel`` with seeded random weights and ``hidden_size`` outputs.

    With ``projection_dim``: a ``CLIPTextModelWithProjection`` (SDXL's second
    text encoder), whose ``text_embeds`` output is ``projection_dim`` wide.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                            projection_dim=projection_dim or hidden_size)
    kind = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return kind(config).eval().requires_grad_(False)


def tiny_vae(seed: int = RANDOM_SEED, scaling_factor: float = 0.18215) -> Any:
    """A small ``AutoencoderKL`` (4 levels: image / 8 = latent, as SD) with seeded random weights."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=256,
            scaling_factor=scaling_factor,
        )
    return vae.eval().requires_grad_(False)


def tiny_pipeline(scheduler: str = "pndm", seed: int = RANDOM_SEED, unet: torch.nn.Module | None = None,
                  with_text_encoder: bool = True, prediction_type: str = "epsilon") -> Any:
    """An offline ``StableDiffusionPipeline`` around the tiny U-Net (or ``unet``), all weights seeded.

    ``scheduler``: ``pndm`` (PLMS with skip_prk_steps, as SD 1.5), ``ddim`` or
    ``euler``; ``prediction_type="v_prediction"`` for an SD 2.x 768-style U-Net.
    ``with_text_encoder=False`` leaves out the tokenizer and text
    encoder: call it with ``prompt_embeds=`` and ``negative_prompt_embeds=``.
    No safety checker. Default size 256x256 (latent 32x32); use
    ``height``/``width`` multiples of 8.
    """
    from diffusers import StableDiffusionPipeline

    sched = make_scheduler(scheduler, prediction_type)
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


def tiny_xl_pipeline(scheduler: str = "euler", seed: int = RANDOM_SEED, unet: torch.nn.Module | None = None,
                     with_text_encoder: bool = True) -> Any:
    """An offline ``StableDiffusionXLPipeline`` around ``tiny-xl`` (or ``unet``), all weights seeded.

    Two character-level tokenizers and two random 2-layer text encoders (the
    second with a projection whose pooled output is the U-Net's
    ``text_embeds``), each half of the U-Net's text width, as SDXL's 768 +
    1280 = 2048. ``scheduler``: ``euler`` (default, as SDXL base ships),
    ``pndm`` or ``ddim``. ``with_text_encoder=False`` leaves both out: call
    it with ``prompt_embeds``, ``pooled_prompt_embeds`` and their
    ``negative_`` counterparts. Default size 256x256; ``height``/``width``
    multiples of 16 keep the downsample-2 merge grid whole.
    """
    from diffusers import StableDiffusionXLPipeline

    from catome_export.models.registry import added_conditioning_dims

    unet = load_unet("tiny-xl", "random") if unet is None else unet
    dims = added_conditioning_dims(unet.config)
    if dims is None:
        raise CatomeError("tiny_xl_pipeline needs a U-Net with SDXL's added conditioning (addition_embed_type "
                          "text_time): use tiny_pipeline for SD 1.x/2.x layouts")
    text_dim = int(unet.config.cross_attention_dim)
    if text_dim % 2:
        raise CatomeError(f"the U-Net's text width {text_dim} cannot be split between two text encoders")
    tokenizer = tokenizer_2 = text_encoder = text_encoder_2 = None
    if with_text_encoder:
        tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
        text_encoder = tiny_text_encoder(len(tokenizer), text_dim // 2, seed)
        text_encoder_2 = tiny_text_encoder(len(tokenizer_2), text_dim // 2, seed + 1, projection_dim=dims[0])
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed, scaling_factor=0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=make_scheduler(scheduler),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_controlnet(unet: torch.nn.Module, seed: int = RANDOM_SEED) -> Any:
    """A ``ControlNetModel`` made from ``unet`` (``ControlNetModel.from_unet``: its down path and mid block, copied)
    with seeded weights where diffusers starts it at zero.

    A fresh ControlNet's output convolutions (``controlnet_down_blocks``,
    ``controlnet_mid_block``) and the last convolution of its conditioning
    embedding are zero, so its residuals are zero and a test of where they
    are added could not fail; here they get PyTorch's default (seeded)
    initialisation instead, so every residual is non-zero. Works for the SD
    1.x/2.x and SDXL layouts (``tiny``, ``tiny-xl``).
    """
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet)
        for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                     controlnet.controlnet_cond_embedding.conv_out):
            conv.reset_parameters()
    if controlnet.dtype != unet.dtype:
        controlnet = controlnet.to(dtype=unet.dtype)
    return controlnet.eval().requires_grad_(False)


def controlnet_pipeline(pipe: Any, controlnet: Any) -> Any:
    """The ``StableDiffusionControlNetPipeline`` (or ``StableDiffusionXLControlNetPipeline`` for an SDXL pipeline)
    with ``pipe``'s components and ``controlnet`` (one ``ControlNetModel``, a list of them, or a
    ``MultiControlNetModel``)."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    if isinstance(pipe, StableDiffusionXLPipeline):
        parts = {k: v for k, v in pipe.components.items() if k in (
            "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler",
            "feature_extractor", "image_encoder")}
        out = StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet, add_watermarker=False)
    else:
        parts = {k: v for k, v in pipe.components.items() if k in (
            "vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor",
            "image_encoder")}
        out = StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, requires_safety_checker=False)
    out.set_progress_bar_config(disable=True)
    return out
