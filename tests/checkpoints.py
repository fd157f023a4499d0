"""Single-file checkpoints in the original (LDM) layout, written from diffusers modules for tests.

The inverse of diffusers' single-file converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``), after
diffusers' own ``scripts/convert_diffusers_to_original_stable_diffusion.py``
but driven by the config (any ``layers_per_block``, levels with or without
attention), so the tiny models can be written as A1111-style files:
``model.diffusion_model.*`` (U-Net), ``first_stage_model.*`` (VAE),
``cond_stage_model.transformer.*`` (CLIP text encoder). Loading such a file
back through the project (which uses diffusers' forward converters) and
comparing every tensor checks both directions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def ldm_unet_key(key: str, config: Any) -> str:
    """The original-layout name (without ``model.diffusion_model.``) of a diffusers U-Net weight."""
    per = int(config["layers_per_block"]) + 1
    module, _, leaf = key.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{leaf}"
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = per * i + j + 1
        return f"input_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{per * (int(m[1]) + 1)}.0.op.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = per * i + j
        return f"output_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        i = int(m[1])
        has_attention = "CrossAttn" in config["up_block_types"][i]
        return f"output_blocks.{per * i + per - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    raise KeyError(key)


def ldm_unet_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.*`` tensors of a diffusers ``UNet2DConditionModel``."""
    config = dict(unet.config)
    return {f"model.diffusion_model.{ldm_unet_key(k, config)}": v.detach().clone()
            for k, v in unet.state_dict().items()}


_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_VAE_TOP = {"conv_norm_out": "norm_out"}


def ldm_vae_key(key: str, levels: int) -> str:
    """The original-layout name (without ``first_stage_model.``) of a diffusers ``AutoencoderKL`` weight."""
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    module, _, leaf = rest.rpartition(".")
    if module in _VAE_TOP:
        return f"{side}.{_VAE_TOP[module]}.{leaf}"
    if module in ("conv_in", "conv_out"):
        return key
    m = re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest)
    if m:
        level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
        return f"{side}.{m[1]}.{level}.block.{m[3]}.{m[4].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", rest)
    if m:
        return f"{side}.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", rest)
    if m:
        return f"{side}.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest)
    if m:
        return f"{side}.mid.block_{int(m[1]) + 1}.{m[2]}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", rest)
    if m:
        for new, old in _VAE_ATTENTION:
            if m[1].startswith(new + "."):
                return f"{side}.mid.attn_1.{old}{m[1][len(new):]}"
    raise KeyError(key)


def ldm_vae_state_dict(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``first_stage_model.*`` tensors of a diffusers ``AutoencoderKL`` (attention projections as 1x1 convs)."""
    levels = len(vae.config.down_block_types)
    out = {}
    for k, v in vae.state_dict().items():
        name = ldm_vae_key(k, levels)
        t = v.detach().clone()
        if ".mid.attn_1." in name and name.endswith("weight") and t.ndim == 2:
            t = t[:, :, None, None]  # the original VAE's attention projections are 1x1 convolutions
        out[f"first_stage_model.{name}"] = t
    return out


def ldm_clip_state_dict(encoder: torch.nn.Module,
                        prefix: str = "cond_stage_model.transformer.") -> dict[str, torch.Tensor]:
    """``cond_stage_model.transformer.text_model.*`` tensors of a ``CLIPTextModel`` (flattened or not)."""
    inner = "" if hasattr(encoder, "text_model") else "text_model."
    return {f"{prefix}{inner}{k}": v.detach().clone() for k, v in encoder.state_dict().items()}


def write_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """``.safetensors`` (safetensors' ``save_file``) or ``.ckpt`` (``{"state_dict": ...}`` as training code saves)."""
    target = Path(path)
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    if target.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(contiguous, str(target))
    else:
        torch.save({"state_dict": contiguous}, target)
    return target


def ldm_open_clip_state_dict(encoder: torch.nn.Module,
                             prefix: str = "conditioner.embedders.1.model.") -> dict[str, torch.Tensor]:
    """OpenCLIP-layout tensors (SD 2.x's ``cond_stage_model.model.*``, SDXL's second encoder) of a CLIP text model.

    q, k and v go into one ``in_proj`` as OpenCLIP keeps them; the text projection is stored transposed.
    """
    own = {k if hasattr(encoder, "text_model") or k.startswith("text_projection") else f"text_model.{k}":
           v.detach().clone() for k, v in encoder.state_dict().items()}
    out = {f"{prefix}positional_embedding": own["text_model.embeddings.position_embedding.weight"],
           f"{prefix}token_embedding.weight": own["text_model.embeddings.token_embedding.weight"],
           f"{prefix}ln_final.weight": own["text_model.final_layer_norm.weight"],
           f"{prefix}ln_final.bias": own["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in own:
        out[f"{prefix}text_projection"] = own["text_projection.weight"].T.contiguous()
    for i in range(encoder.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for new, old in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                         ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
            for leaf in ("weight", "bias"):
                out[f"{dst}{old}.{leaf}"] = own[f"{src}{new}.{leaf}"]
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([own[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
    return out
