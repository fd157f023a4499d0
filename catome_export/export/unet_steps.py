"""A diffusers U-Net of the Stable Diffusion layout as a flat list of small steps.

Each :class:`Step` reads named tensors from an environment, calls real
submodules of the U-Net (resnets, Transformer2DModels, attention modules,
norms, samplers) and writes named tensors back. Walking the whole list is
``unet.forward`` for what Stable Diffusion uses (tested against it); cutting
the list at the merge sites gives the stages (see :mod:`.stages`).

The transformer blocks that are merge sites are split open: the
Transformer2DModel's ``norm`` + ``proj_in`` (step ``...pre``) writes the
block input ``x{k}``, the block step runs merge -> attn1 -> unmerge and then
attn2 and ff with the block's own submodules (norm1, attn1, norm2, attn2,
norm3, ff), and ``...post`` applies ``proj_out`` and the residual. Every other
Transformer2DModel is called whole.

The names of the tensors that can cross a cut follow
:mod:`catome_export.engine.io_names`.

With ``controlnet=True`` the up path's concatenation steps also read the
ControlNet residuals, exactly where ``UNet2DConditionModel.forward`` adds
them: ``controlnet_down{i}`` is added to the skip tensor ``skip{i}`` as the
up path takes it (diffusers adds all of them to ``down_block_res_samples``
after the down path, which only the up path reads afterwards), and
``controlnet_mid`` to the mid block's output in the first concatenation of
the up path (its only reader). Keeping each addition in the step that
consumes its sum keeps DeepCache's semantics on a cached call as they are:
a residual is used exactly when the module that reads its sum runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from catome_export.errors import CatomeError
from catome_export.engine.io_names import (
    CONTROLNET_MID, EMB, MODEL_OUTPUT, SAMPLE, TEXT, TEXT_EMBEDS, TIME_IDS, TIMESTEP, controlnet_down_name, plan_names, site_input_name, site_output_name, site_residual_name, skip_name,
)
from catome_export.merging.plan import merge_tokens, unmerge_tokens
from catome_export.models.sites import MergeSite

SUPPORTED_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_MID = ("UNetMidBlock2DCrossAttn",)
SUPPORTED_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class Step:
    """One small piece of the U-Net over a name -> tensor environment."""

    name: str
    """What it runs (a module path, or a module path with a suffix)."""
    reads: tuple[str, ...]
    """Names passed positionally to ``fn``."""
    writes: tuple[str, ...]
    """Names given to ``fn``'s results (a single tensor or a tuple)."""
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    """Module path -> the real submodule ``fn`` calls (registered on the stage module)."""
    site: int | None = None
    """Merge site whose block this step runs (its plan tensors are among ``reads``)."""
    residuals: tuple[tuple[str, str], ...] = ()
    """(ControlNet residual input, name of the tensor it is added to) for each residual among ``reads``."""

    def run(self, env: dict[str, torch.Tensor]) -> None:
        out = self.fn(*(env[n] for n in self.reads))
        outs = out if isinstance(out, tuple) else (out,)
        if len(outs) != len(self.writes):
            raise RuntimeError(f"step {self.name} returned {len(outs)} tensors for {len(self.writes)} names")
        env.update(zip(self.writes, outs))


@dataclass(frozen=True)
class BlockOptions:
    """Where merging applies inside a site block (attn1 always)."""

    merge_crossattn: bool = False
    """Merge around cross-attention (attn2) too, with the same plan."""
    merge_mlp: bool = False
    """Merge around the feed-forward block too, with the same plan."""


def site_block_forward(block: torch.nn.Module, x: torch.Tensor, ehs: torch.Tensor, plan: tuple[torch.Tensor, ...],
                       options: BlockOptions = BlockOptions()) -> torch.Tensor:
    """A ``BasicTransformerBlock`` (norm_type ``layer_norm``) with merge -> attn1 -> unmerge.

    ``plan`` is ``MergePlan.tensors()``; merge and unmerge are the shared
    :func:`merge_tokens` / :func:`unmerge_tokens`, so an identity plan leaves
    the block's result exactly as diffusers computes it.
    """
    keep, src, slot, weight, unmerge = plan

    def merged(fn: Callable[[torch.Tensor], torch.Tensor], normed: torch.Tensor, on: bool) -> torch.Tensor:
        if not on:
            return fn(normed)
        return unmerge_tokens(fn(merge_tokens(normed, keep, src, slot, weight)), unmerge)

    x = merged(lambda t: block.attn1(t), block.norm1(x), True) + x
    if block.attn2 is not None:
        x = merged(lambda t: block.attn2(t, encoder_hidden_states=ehs), block.norm2(x), options.merge_crossattn) + x
    x = merged(block.ff, block.norm3(x), options.merge_mlp) + x
    return x


def _check_block(path: str, block: torch.nn.Module) -> None:
    """Reject BasicTransformerBlock variants that :func:`site_block_forward` does not express."""
    problems = []
    if getattr(block, "norm_type", None) != "layer_norm":
        problems.append(f"norm_type {getattr(block, 'norm_type', None)!r} (only 'layer_norm' is supported)")
    if getattr(block, "only_cross_attention", False):
        problems.append("only_cross_attention=True")
    if getattr(block, "pos_embed", None) is not None:
        problems.append("positional embeddings")
    if getattr(block, "fuser", None) is not None:
        problems.append("GLIGEN fuser")
    if problems:
        raise CatomeError(f"merge site {path}: unsupported BasicTransformerBlock ({', '.join(problems)}); "
                          "only the Stable Diffusion 1.x/2.x block layout can be exported")


def _check_transformer(path: str, t2d: torch.nn.Module) -> None:
    if type(t2d).__name__ != "Transformer2DModel" or not getattr(t2d, "is_input_continuous", False):
        raise CatomeError(f"{path}: unsupported attention module {type(t2d).__name__} "
                          "(only continuous-input Transformer2DModel is supported)")


def _check_unet(unet: torch.nn.Module) -> None:
    cfg = unet.config
    unsupported = {
        "class_embed_type": cfg.get("class_embed_type"),
        "addition_embed_type": None if cfg.get("addition_embed_type") == "text_time" else cfg.get("addition_embed_type"),
        "encoder_hid_dim_type": cfg.get("encoder_hid_dim_type"),
        "time_embedding_act_fn": cfg.get("time_embedding_act_fn"),
    }
    bad = [f"{k}={v!r}" for k, v in unsupported.items() if v is not None]
    if cfg.get("center_input_sample"):
        bad.append("center_input_sample=True")
    if getattr(unet, "conv_norm_out", None) is None:
        bad.append("no conv_norm_out")
    if bad:
        raise CatomeError(f"unsupported U-Net configuration ({', '.join(bad)}): only the Stable Diffusion "
                          "1.x/2.x and SDXL layouts can be exported")
    for where, blocks, allowed in (("down_blocks", unet.down_blocks, SUPPORTED_DOWN),
                                   ("up_blocks", unet.up_blocks, SUPPORTED_UP)):
        for i, block in enumerate(blocks):
            name = type(block).__name__
            if name not in allowed:
                raise CatomeError(f"unsupported block type {name} at {where}.{i}: the export supports "
                                  f"{' and '.join(allowed)} there (Stable Diffusion layout)")
            if getattr(block, "s1", None):
                raise CatomeError(f"{where}.{i} has FreeU enabled: call unet.disable_freeu() before exporting")
    if unet.mid_block is not None and type(unet.mid_block).__name__ not in SUPPORTED_MID:
        raise CatomeError(f"unsupported block type {type(unet.mid_block).__name__} at mid_block: the export "
                          f"supports {SUPPORTED_MID[0]} (Stable Diffusion layout)")


def _check_upsampler(path: str, up: torch.nn.Module) -> None:
    ok = (type(up).__name__ == "Upsample2D" and getattr(up, "interpolate", False) and getattr(up, "use_conv", False)
          and not getattr(up, "use_conv_transpose", False) and getattr(up, "norm", None) is None
          and getattr(up, "name", None) == "conv")
    if not ok:
        raise CatomeError(f"{path}: unsupported upsampler {type(up).__name__} (only nearest Upsample2D with a conv)")


class _Builder:
    """Collects steps and hands out fresh internal names."""

    def __init__(self, unet: torch.nn.Module, sites: list[MergeSite], options: BlockOptions) -> None:
        self.unet = unet
        self.steps: list[Step] = []
        self.options = options
        self.site_of = {s.path: s.index for s in sites}

    @staticmethod
    def fresh(path: str) -> str:
        """The name of the tensor step ``path`` writes (``up_blocks.1.resnets.2.out``): a stage boundary between
        two steps (a merge site's, the feature cache's, a size cut's) names a tensor by the module that made it."""
        return f"{path}.out"

    def add(self, name: str, reads: tuple[str, ...], writes: tuple[str, ...], fn: Callable,
            modules: dict[str, torch.nn.Module], site: int | None = None,
            residuals: tuple[tuple[str, str], ...] = ()) -> None:
        self.steps.append(Step(name, reads, writes, fn, modules, site, residuals))

    # -- pieces --------------------------------------------------------------------------
    def resnet(self, path: str, module: torch.nn.Module, h: str, out: str | None = None) -> str:
        out = out or self.fresh(path)
        self.add(path, (h, EMB), (out,), lambda x, emb: module(x, emb), {path: module})
        return out

    def transformer(self, path: str, t2d: torch.nn.Module, h: str, out: str | None = None) -> str:
        """A whole Transformer2DModel, or split open when it holds merge sites."""
        _check_transformer(path, t2d)
        block_paths = [f"{path}.transformer_blocks.{j}" for j in range(len(t2d.transformer_blocks))]
        site_ids = [self.site_of.get(p) for p in block_paths]
        out = out or self.fresh(path)
        if all(s is None for s in site_ids):
            self.add(path, (h, TEXT), (out,),
                     lambda x, ehs: t2d(x, encoder_hidden_states=ehs, return_dict=False)[0], {path: t2d})
            return out
        if any(s is None for s in site_ids):
            raise CatomeError(f"{path}: only some of its transformer blocks are merge sites; the export needs all "
                              "blocks of one Transformer2DModel at the same merge level")
        first = site_ids[0]
        residual = site_residual_name(first)
        tokens = site_input_name(first)
        self.add(f"{path}.pre", (h,), (residual, tokens), lambda x: (x, _t2d_pre(t2d, x)),
                 {f"{path}.norm": t2d.norm, f"{path}.proj_in": t2d.proj_in})
        for j, (bpath, site) in enumerate(zip(block_paths, site_ids)):
            block = t2d.transformer_blocks[j]
            _check_block(bpath, block)
            nxt = site_input_name(site_ids[j + 1]) if j + 1 < len(site_ids) else site_output_name(site)
            reads = (tokens, TEXT, *plan_names(site))
            opts = self.options
            self.add(bpath, reads, (nxt,),
                     lambda x, ehs, *plan, _b=block: site_block_forward(_b, x, ehs, tuple(plan), opts),
                     {bpath: block}, site=site)
            tokens = nxt
        self.add(f"{path}.post", (tokens, residual), (out,), lambda y, res: _t2d_post(t2d, y, res),
                 {f"{path}.proj_out": t2d.proj_out})
        return out


def _t2d_pre(t2d: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Transformer2DModel input [B, C, H, W] -> block tokens [B, H*W, C'] (norm, proj_in)."""
    b, _, hh, ww = x.shape
    x = t2d.norm(x)
    if t2d.use_linear_projection:
        return t2d.proj_in(x.permute(0, 2, 3, 1).reshape(b, hh * ww, x.shape[1]))
    x = t2d.proj_in(x)
    return x.permute(0, 2, 3, 1).reshape(b, hh * ww, x.shape[1])


def _t2d_post(t2d: torch.nn.Module, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Block tokens [B, H*W, C'] -> Transformer2DModel output [B, C, H, W] (proj_out, + residual)."""
    b, _, hh, ww = residual.shape
    if t2d.use_linear_projection:
        y = t2d.proj_out(y)
        return y.reshape(b, hh, ww, y.shape[-1]).permute(0, 3, 1, 2).contiguous() + residual
    y = y.reshape(b, hh, ww, y.shape[-1]).permute(0, 3, 1, 2).contiguous()
    return t2d.proj_out(y) + residual


def _text_time_embedding(unet: torch.nn.Module, sample: torch.Tensor, t: torch.Tensor, text_embeds: torch.Tensor,
                         time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's embedding: time embedding + ``add_embedding([text_embeds, add_time_proj(time_ids)])``.

    The same computation as ``UNet2DConditionModel.get_aug_embed`` for
    ``addition_embed_type="text_time"``.
    """
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=t), None)
    time_embeds = unet.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
    add_embeds = torch.cat([text_embeds, time_embeds.to(text_embeds.dtype)], dim=-1).to(emb.dtype)
    return emb + unet.add_embedding(add_embeds)


def _upsample(up: torch.nn.Module, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Nearest upsampling to the size of the next skip tensor, then the upsampler's conv.

    diffusers passes that size only when the latent is not a multiple of the
    total upsampling factor and doubles otherwise; both are the same tensor
    when the size is exactly double, so the graph always takes the skip's size
    and serves every latent size with one code path.
    """
    return up.conv(F.interpolate(x, size=like.shape[-2:], mode="nearest"))


def _cat(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, skip], dim=1)


def _cat_residual(x: torch.Tensor, skip: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """diffusers' ``down_block_res_sample + down_block_additional_residual``, then the up block's concatenation."""
    return torch.cat([x, skip + residual], dim=1)


def _cat_residuals(x: torch.Tensor, mid: torch.Tensor, skip: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``sample + mid_block_additional_residual`` after the mid block, then the first concatenation."""
    return torch.cat([x + mid, skip + residual], dim=1)


def build_steps(unet: torch.nn.Module, sites: list[MergeSite], options: BlockOptions = BlockOptions(), *,
                controlnet: bool = False) -> list[Step]:
    """The U-Net as a flat list of steps; site block steps carry their site index.

    ``controlnet``: the up path's concatenations also read the ControlNet residuals (see the module docstring).
    """
    _check_unet(unet)
    known = {path for path, _ in unet.named_modules()}
    for s in sites:
        if s.path not in known:
            raise CatomeError(f"merge site {s.index} ({s.path}) is not a module of this U-Net: find the sites with "
                              "find_merge_sites(unet)")
    b = _Builder(unet, sites, options)
    if unet.config.get("addition_embed_type") == "text_time":
        b.add("time_embedding", (SAMPLE, TIMESTEP, TEXT_EMBEDS, TIME_IDS), (EMB,),
              lambda sample, t, text_embeds, time_ids: _text_time_embedding(unet, sample, t, text_embeds, time_ids),
              {"time_proj": unet.time_proj, "time_embedding": unet.time_embedding,
               "add_time_proj": unet.add_time_proj, "add_embedding": unet.add_embedding})
    else:
        b.add("time_embedding", (SAMPLE, TIMESTEP), (EMB,),
              lambda sample, t: unet.time_embedding(unet.get_time_embed(sample=sample, timestep=t), None),
              {"time_proj": unet.time_proj, "time_embedding": unet.time_embedding})
    b.add("conv_in", (SAMPLE,), (skip_name(0),), lambda s: unet.conv_in(s), {"conv_in": unet.conv_in})
    skips = [skip_name(0)]
    h = skips[0]
    for i, block in enumerate(unet.down_blocks):
        attns = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            skip = skip_name(len(skips))
            if attns is None:
                h = b.resnet(f"down_blocks.{i}.resnets.{j}", resnet, h, out=skip)
            else:
                h = b.resnet(f"down_blocks.{i}.resnets.{j}", resnet, h)
                h = b.transformer(f"down_blocks.{i}.attentions.{j}", attns[j], h, out=skip)
            skips.append(skip)
        if block.downsamplers is not None:
            for j, down in enumerate(block.downsamplers):
                path = f"down_blocks.{i}.downsamplers.{j}"
                out = skip_name(len(skips))
                b.add(path, (h,), (out,), lambda x, _d=down: _d(x), {path: down})
                h = out
            skips.append(h)
    if unet.mid_block is not None:
        mid = unet.mid_block
        h = b.resnet("mid_block.resnets.0", mid.resnets[0], h)
        for j, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
            h = b.transformer(f"mid_block.attentions.{j}", attn, h)
            h = b.resnet(f"mid_block.resnets.{j + 1}", resnet, h)
    mid_pending = controlnet  # mid_block_additional_residual goes into the first concatenation of the up path
    for i, block in enumerate(unet.up_blocks):
        attns = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            if not skips:
                raise CatomeError(f"up_blocks.{i} needs more skip tensors than the down path makes")
            skip = skips.pop()
            name = f"up_blocks.{i}.cat{j}"
            cat = b.fresh(name)
            if not controlnet:
                b.add(name, (h, skip), (cat,), _cat, {})
            else:
                residual = controlnet_down_name(len(skips))  # skips[len(skips)] was just popped
                if mid_pending:
                    b.add(name, (h, CONTROLNET_MID, skip, residual), (cat,), _cat_residuals, {},
                          residuals=((CONTROLNET_MID, h), (residual, skip)))
                    mid_pending = False
                else:
                    b.add(name, (h, skip, residual), (cat,), _cat_residual, {}, residuals=((residual, skip),))
            h = b.resnet(f"up_blocks.{i}.resnets.{j}", resnet, cat)
            if attns is not None:
                h = b.transformer(f"up_blocks.{i}.attentions.{j}", attns[j], h)
        if block.upsamplers is not None:
            if not skips:
                raise CatomeError(f"up_blocks.{i} upsamples after the last skip tensor: unsupported layout")
            for j, up in enumerate(block.upsamplers):
                path = f"up_blocks.{i}.upsamplers.{j}"
                _check_upsampler(path, up)
                out = b.fresh(path)
                b.add(path, (h, skips[-1]), (out,), lambda x, like, _u=up: _upsample(_u, x, like), {path: up})
                h = out
    if skips:
        raise CatomeError(f"the up path leaves {len(skips)} skip tensors unused: unsupported layout")
    b.add("conv_out", (h,), (MODEL_OUTPUT,), lambda x: unet.conv_out(unet.conv_act(unet.conv_norm_out(x))),
          {"conv_norm_out": unet.conv_norm_out, "conv_out": unet.conv_out})
    _check_site_order(b.steps, sites)
    return b.steps


def _check_site_order(steps: list[Step], sites: list[MergeSite]) -> None:
    order = [s.site for s in steps if s.site is not None]
    if order != list(range(len(sites))):
        raise CatomeError(f"merge sites run in the order {order}: number them 0..{len(sites) - 1} in execution "
                          "order (find_merge_sites does)")
