"""An analytic multiply-add (MAC) model of a Stable-Diffusion-layout U-Net.

Counts the matrix work of one U-Net call from the model's config alone:
every convolution (``Cin * k * k`` MACs per output element), every linear
layer (``in * out`` per row; SDXL's added-conditioning embedding included),
and the two attention products of every
attention layer (``Q K^T`` and ``A V``: ``Nq * Nk * C`` each, summed over
heads). Normalisations, activations, softmax, the sinusoidal timestep
projection and the merge/unmerge gathers are elementwise and left out, the
same convention as ``torch.utils.flop_counter.FlopCounterMode`` (which
reports FLOPs = 2 * MACs and which the tests compare this model with).

Merging ``r`` tokens at a merge site shrinks what the site's block runs on
the merged tokens: with the defaults only self-attention (attn1: the q/k/v/out
projections on ``N - r`` tokens and the ``(N - r) x (N - r)`` attention);
with ``merge_crossattn`` also attn2's q/out projections and its products;
with ``merge_mlp`` also the feed-forward. The ideal speedup of a merge
fraction is ``macs(0) / macs(f)``: what the step would gain if time were
proportional to multiply-adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from catome_export.errors import CatomeError

_CROSS_DOWN = "CrossAttnDownBlock2D"
_PLAIN_DOWN = "DownBlock2D"
_CROSS_UP = "CrossAttnUpBlock2D"
_PLAIN_UP = "UpBlock2D"
_MID = "UNetMidBlock2DCrossAttn"


@dataclass(frozen=True)
class SiteMacs:
    """The transformer block of one merge site at one shape."""

    index: int
    """Merge site index (execution order, as ``find_merge_sites``)."""
    grid: tuple[int, int]
    """(h, w) token grid of the block; N = h * w."""
    channels: int
    """C: width of the block."""
    merged: int
    """r: tokens merged away before attn1."""
    attn1_macs: int
    """Self-attention MACs (projections + both products) after merging, whole batch."""


@dataclass(frozen=True)
class UNetMacs:
    """Multiply-adds of one U-Net call, split by kind of work."""

    by_part: Mapping[str, int]
    """``conv``, ``linear`` (time embedding, resnet time projections, proj_in/out), ``attn1``,
    ``attn2``, ``ff`` (transformer feed-forward) -> MACs for the whole batch."""
    sites: tuple[SiteMacs, ...] = field(default=())
    """Per merge site, what its self-attention costs at this shape."""

    @property
    def total(self) -> int:
        """All multiply-adds of the call."""
        return int(sum(self.by_part.values()))

    @property
    def flops(self) -> int:
        """2 * MACs (FlopCounterMode's convention)."""
        return 2 * self.total


@dataclass(frozen=True)
class _Shape:
    batch: int
    text_len: int
    text_dim: int


def _cfg(config: Any) -> dict[str, Any]:
    """A plain dict of a diffusers config (FrozenDict, dict, or a model with ``.config``)."""
    cfg = getattr(config, "config", config)
    try:
        return dict(cfg)
    except (TypeError, ValueError):
        raise CatomeError(f"expected a U-Net config (mapping) or a U-Net, got {type(config).__name__}") from None


def _per_block(value: Any, count: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * count
    if isinstance(value, (list, tuple)) and len(value) == count and all(isinstance(v, int) for v in value):
        return list(value)
    raise CatomeError(f"config {name} must be an int or a list of {count} ints, got {value!r}")


def _conv(batch: int, hw: tuple[int, int], cin: int, cout: int, k: int) -> int:
    return batch * hw[0] * hw[1] * cout * cin * k * k


def _half(hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial size after a stride-2, padding-1, 3x3 convolution: ceil(n / 2)."""
    return -(-hw[0] // 2), -(-hw[1] // 2)


class _Counter:
    """Walks the U-Net in execution order and adds up MACs."""

    def __init__(self, cfg: dict[str, Any], latent_hw: tuple[int, int], shape: _Shape,
                 merged: Mapping[int, int], max_downsample: int, merge_crossattn: bool, merge_mlp: bool,
                 matching: bool = False, stride: tuple[int, int] = (2, 2)) -> None:
        self.cfg = cfg
        self.latent_hw = latent_hw
        self.shape = shape
        self.merged = dict(merged)
        self.max_downsample = max_downsample
        self.merge_crossattn = merge_crossattn
        self.merge_mlp = merge_mlp
        self.matching = matching
        self.stride = stride
        self.parts = {"conv": 0, "linear": 0, "attn1": 0, "attn2": 0, "ff": 0}
        if matching:
            self.parts["matching"] = 0
        self.sites: list[SiteMacs] = []
        self.next_site = 0
        self.temb_dim = 4 * int(cfg["block_out_channels"][0])

    # -- layers -----------------------------------------------------------------------
    def resnet(self, hw: tuple[int, int], cin: int, cout: int) -> None:
        b = self.shape.batch
        self.parts["conv"] += _conv(b, hw, cin, cout, 3) + _conv(b, hw, cout, cout, 3)
        if cin != cout:
            self.parts["conv"] += _conv(b, hw, cin, cout, 1)
        self.parts["linear"] += b * self.temb_dim * cout

    def transformer(self, hw: tuple[int, int], channels: int, depth: int, downsample: int) -> None:
        b, n, c = self.shape.batch, hw[0] * hw[1], channels
        lt, d = self.shape.text_len, self.shape.text_dim
        self.parts["linear"] += 2 * b * n * c * c  # proj_in + proj_out (1x1 conv or linear: same MACs)
        for _ in range(depth):
            r = 0
            site = None
            if downsample <= self.max_downsample:
                site = self.next_site
                self.next_site += 1
                r = int(self.merged.get(site, 0))
                if r < 0 or r >= n:
                    raise CatomeError(f"site {site}: cannot merge {r} of its {n} tokens")
            m = n - r
            attn1 = b * (4 * m * c * c + 2 * m * m * c)
            self.parts["attn1"] += attn1
            nq = m if self.merge_crossattn else n
            self.parts["attn2"] += b * (2 * nq * c * c + 2 * lt * d * c + 2 * nq * lt * c)
            nf = m if self.merge_mlp else n
            self.parts["ff"] += b * nf * (8 * c * c + 4 * c * c)  # GEGLU: C -> 2 * 4C, then 4C -> C
            if site is not None:
                self.sites.append(SiteMacs(site, hw, c, r, attn1))
                if self.matching:
                    num_dst = (hw[0] // self.stride[0]) * (hw[1] // self.stride[1])
                    self.parts["matching"] += b * (n - num_dst) * num_dst * c  # cosine similarity src x dst

    def added_embedding(self) -> None:
        """SDXL's added conditioning (``addition_embed_type: text_time``): ``add_time_proj`` is sinusoidal (no
        MACs); ``add_embedding`` maps [text_embeds, time_ids features] (projection_class_embeddings_input_dim
        wide) through linear_1 and linear_2 to the time-embedding width."""
        kind = self.cfg.get("addition_embed_type")
        if kind is None:
            return
        if kind != "text_time":
            raise CatomeError(f"the FLOP model knows addition_embed_type text_time (SDXL), not {kind!r}")
        width = int(self.cfg.get("projection_class_embeddings_input_dim") or 0)
        if width <= 0:
            raise CatomeError("config: addition_embed_type text_time needs projection_class_embeddings_input_dim")
        self.parts["linear"] += self.shape.batch * (width * self.temb_dim + self.temb_dim * self.temb_dim)

    # -- the model --------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        b = self.shape.batch
        chans = [int(c) for c in cfg["block_out_channels"]]
        levels = len(chans)
        down_types = list(cfg["down_block_types"])
        up_types = list(cfg["up_block_types"])
        mid_type = cfg.get("mid_block_type", _MID) or _MID
        if len(down_types) != levels or len(up_types) != levels:
            raise CatomeError("config: down_block_types, up_block_types and block_out_channels differ in length")
        for t in down_types:
            if t not in (_CROSS_DOWN, _PLAIN_DOWN):
                raise CatomeError(f"the FLOP model knows {_CROSS_DOWN} and {_PLAIN_DOWN}, not {t!r}")
        for t in up_types:
            if t not in (_CROSS_UP, _PLAIN_UP):
                raise CatomeError(f"the FLOP model knows {_CROSS_UP} and {_PLAIN_UP}, not {t!r}")
        if mid_type != _MID:
            raise CatomeError(f"the FLOP model knows the {_MID} mid block, not {mid_type!r}")
        layers = _per_block(cfg.get("layers_per_block", 2), levels, "layers_per_block")
        depth = _per_block(cfg.get("transformer_layers_per_block", 1) or 1, levels, "transformer_layers_per_block")
        rev_depth = cfg.get("reverse_transformer_layers_per_block")
        up_depth = _per_block(rev_depth, levels, "reverse_transformer_layers_per_block") if rev_depth \
            else list(reversed(depth))
        in_ch = int(cfg.get("in_channels", 4))
        out_ch = int(cfg.get("out_channels", 4))
        k_in = int(cfg.get("conv_in_kernel", 3))
        k_out = int(cfg.get("conv_out_kernel", 3))

        # time embedding: sinusoidal projection (no MACs), linear_1, linear_2
        self.parts["linear"] += b * (chans[0] * self.temb_dim + self.temb_dim * self.temb_dim)
        self.added_embedding()
        hw = self.latent_hw
        self.parts["conv"] += _conv(b, hw, in_ch, chans[0], k_in)
        skips = [chans[0]]
        sizes = [hw]  # spatial size per level
        cur = chans[0]
        for i, kind in enumerate(down_types):
            out = chans[i]
            ds = 2 ** i
            for _ in range(layers[i]):
                self.resnet(hw, cur, out)
                cur = out
                if kind == _CROSS_DOWN:
                    self.transformer(hw, out, depth[i], ds)
                skips.append(out)
            if i < levels - 1:
                hw = _half(hw)
                self.parts["conv"] += _conv(b, hw, out, out, 3)
                skips.append(out)
                sizes.append(hw)
        # mid block: resnet, transformer, resnet at the lowest level
        self.resnet(hw, cur, cur)
        self.transformer(hw, cur, depth[-1], 2 ** (levels - 1))
        self.resnet(hw, cur, cur)
        rev = list(reversed(chans))
        for i, kind in enumerate(up_types):
            level = levels - 1 - i
            hw = sizes[level]
            out = rev[i]
            for _ in range(layers[levels - 1 - i] + 1):
                skip = skips.pop()
                self.resnet(hw, cur + skip, out)
                cur = out
                if kind == _CROSS_UP:
                    self.transformer(hw, out, up_depth[i], 2 ** level)
            if i < levels - 1:
                self.parts["conv"] += _conv(b, sizes[level - 1], out, out, 3)  # upsample x2, then conv
        self.parts["conv"] += _conv(b, sizes[0], cur, out_ch, k_out)


def site_grids(config: Any, latent_hw: tuple[int, int], max_downsample: int = 1) -> list[tuple[int, int]]:
    """(h, w) grid of every merge site, in site order."""
    counter = _count(config, latent_hw, 1, 1, None, {}, max_downsample, False, False)
    return [s.grid for s in counter.sites]


def _count(config: Any, latent_hw: tuple[int, int], batch: int, text_len: int, text_dim: int | None,
           merged: Mapping[int, int], max_downsample: int, merge_crossattn: bool, merge_mlp: bool,
           matching: bool = False, stride: tuple[int, int] = (2, 2)) -> _Counter:
    cfg = _cfg(config)
    h, w = (int(v) for v in latent_hw)
    if h < 1 or w < 1 or batch < 1 or text_len < 1:
        raise CatomeError(f"FLOP model: latent size, batch and text length must be >= 1, got "
                          f"{latent_hw}, {batch}, {text_len}")
    dim = int(text_dim if text_dim is not None else cfg.get("cross_attention_dim", 768))
    counter = _Counter(cfg, (h, w), _Shape(batch, text_len, dim), merged, max_downsample,
                       merge_crossattn, merge_mlp, matching, (int(stride[0]), int(stride[1])))
    counter.run()
    unknown = sorted(set(merged) - {s.index for s in counter.sites})
    if unknown:
        raise CatomeError(f"FLOP model: no merge sites {unknown} in this U-Net (it has {len(counter.sites)})")
    return counter


def unet_macs(config: Any, latent_hw: tuple[int, int], batch: int = 1, *, text_len: int = 77,
              text_dim: int | None = None, merged: Mapping[int, int] | None = None, max_downsample: int = 1,
              merge_crossattn: bool = False, merge_mlp: bool = False, matching: bool = False,
              stride: tuple[int, int] = (2, 2)) -> UNetMacs:
    """Multiply-adds of one U-Net call at ``latent_hw`` and ``batch``.

    ``config``: a diffusers U-Net config (or the U-Net). ``merged``: site index
    -> r tokens merged at that site (sites counted as ``find_merge_sites``
    does with ``max_downsample``); omitted sites merge nothing. ``matching``
    adds the cosine-similarity product of a checkpoint step (src x dst x C per
    site, dst on a ``stride`` grid) as part ``matching``; cached steps have none.
    """
    counter = _count(config, latent_hw, batch, text_len, text_dim, merged or {}, max_downsample,
                     merge_crossattn, merge_mlp, matching, stride)
    return UNetMacs(dict(counter.parts), tuple(counter.sites))


def merged_for_fraction(grids: Sequence[tuple[int, int]], fraction: float,
                        stride: tuple[int, int] = (2, 2)) -> dict[int, int]:
    """r per site for a forced merge fraction, as the controller computes it: round(f * #src)."""
    if not 0.0 <= fraction <= 1.0:
        raise CatomeError(f"merge fraction must be in [0, 1], got {fraction!r}")
    sy, sx = stride
    out = {}
    for i, (h, w) in enumerate(grids):
        num_src = h * w - (h // sy) * (w // sx)
        out[i] = int(round(fraction * num_src))
    return out


def ideal_speedup(config: Any, latent_hw: tuple[int, int], batch: int, fraction: float, *, text_len: int = 77,
                  text_dim: int | None = None, max_downsample: int = 1, stride: tuple[int, int] = (2, 2),
                  merge_crossattn: bool = False, merge_mlp: bool = False) -> float:
    """macs(no merging) / macs(merge fraction ``fraction`` at every site)."""
    grids = site_grids(config, latent_hw, max_downsample)
    merged = merged_for_fraction(grids, fraction, stride)
    kw: dict[str, Any] = dict(text_len=text_len, text_dim=text_dim, max_downsample=max_downsample,
                              merge_crossattn=merge_crossattn, merge_mlp=merge_mlp)
    base = unet_macs(config, latent_hw, batch, **kw).total
    cut = unet_macs(config, latent_hw, batch, merged=merged, **kw).total
    return base / cut
