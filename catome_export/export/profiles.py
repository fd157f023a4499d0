"""TensorRT optimisation profiles of the stages: min / opt / max shape of every input.

Every stage input is described by a :class:`~catome_export.engine.specs.TensorSpec`
whose shape mixes static ints and symbolic dims. This module turns the
symbolic dims into three concrete values each (one per profile corner) from
the built shape ranges of the manifest (``shapes``) and the merge sites.

Symbolic dims and their formulas (``h``, ``w`` = latent height, width):

==========  ====================================================================
dim         value
==========  ====================================================================
``B``       batch size, from ``shapes["batch"]``
``H``       latent height, from ``shapes["latent_height"]``
``W``       latent width, from ``shapes["latent_width"]``
``L``       text length: ``shapes["text_len"]`` (an int, 77 by default, or a
            ``[min, max]`` pair)
``Hd``      latent height at downsample ``d`` (d in 2, 4, 8): ``ceil(h / d)``
``Wd``      latent width at downsample ``d``: ``ceil(w / d)``; the U-Net's
            stride-2 convolutions (padding 1) give ``ceil`` at every level,
            and ``ceil(ceil(h / 2) / 2) == ceil(h / 4)``
``N{k}``    tokens at site k: ``gh * gw`` with the site grid
            ``gh = ceil(h / ds_k)``, ``gw = ceil(w / ds_k)`` (``ds_k`` = the
            site's downsample; ``N = h * w`` at downsample 1)
``R{k}``    rows of the ``src_idx`` / ``slot_idx`` inputs at site k: the merged
            count r, or 1 when nothing is merged (r = 0 is one exact
            self-merge, see :meth:`MergePlan.identity`): 1 .. ``#src`` at
            the largest grid, where ``#src = N - #dst`` and
            ``#dst = (gh // sy) * (gw // sx)`` for the stride ``(sy, sx)``
            (a grid without a full cell has nothing to merge into: r = 0)
``K{k}``    kept tokens ``N{k} - r``: ``max(1, #dst)`` at the smallest grid
            (every src merged) .. ``N{k}`` at the largest grid (nothing merged)
==========  ====================================================================

Every formula is non-decreasing in ``h`` and ``w``, so the min corner is the
smallest batch / latent / text length and the max corner the largest. The opt
corner takes the expected shapes of ``shapes["opt"]`` and the expected merge
level ``F`` (``--opt-merge-fraction`` or :func:`calibrate_opt_fraction`):
``r = round(F * #src)``, ``R = max(r, 1)``, ``K = N - r`` at the opt grid.

No zero-sized dims: every dim of every profile is at least 1. A site that
merges nothing feeds the one self-merge of :meth:`MergePlan.identity`
(``src_idx`` / ``slot_idx`` of shape [B, 1]), so ``R{k}`` has min 1 and no
empty tensor ever reaches an engine: TensorRT 10.13 and 10.14 have a
reported builder error for a dim with min 0 and max > 0 feeding a V3 plugin
(fixed in 10.16), and empty bindings would need dummy addresses.
"""

from __future__ import annotations

import logging
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from catome_export.checks import check_float, check_int, is_int
from catome_export.defaults import DEFAULT_OPT_MERGE_FRACTION, DEFAULT_TEXT_LEN
from catome_export.engine.shapes import ShapeRanges
from catome_export.errors import CatomeError

from catome_export.engine.manifest import Manifest
from catome_export.engine.specs import StageSpec
from catome_export.models.sites import MergeSite

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]
ProfileShapes = tuple[Shape, Shape, Shape]
"""(min, opt, max) shape of one input."""
StageProfile = dict[str, ProfileShapes]
"""Input name -> (min, opt, max) for one stage."""

CORNERS = ("min", "opt", "max")


@dataclass(frozen=True)
class SiteGeometry:
    """What profiles need to know about one merge site."""

    index: int
    downsample: int = 1
    """Downsample factor of the site's level (1 = full latent resolution)."""

    def grid(self, h: int, w: int) -> tuple[int, int]:
        return -(-h // self.downsample), -(-w // self.downsample)


SiteLike = Union["MergeSite", SiteGeometry]
"""A merge site as profiles see it: its index and downsample factor."""


def num_dst(grid: tuple[int, int], stride: tuple[int, int] = (2, 2)) -> int:
    """Number of dst tokens of a grid: one per full sy x sx cell."""
    (gh, gw), (sy, sx) = grid, stride
    return (gh // sy) * (gw // sx)


def num_src(grid: tuple[int, int], stride: tuple[int, int] = (2, 2)) -> int:
    """Number of src tokens of a grid (every token that is not a dst), i.e. the largest possible r."""
    return grid[0] * grid[1] - num_dst(grid, stride)


@dataclass(frozen=True)
class DimEnv:
    """Values of the free variables at one profile corner."""

    corner: str
    batch: int
    height: int
    width: int
    text_len: int
    merge_fraction: float
    """Share of src merged at this corner: 0 at min (for R), 1 at max (for R), F at opt (only opt reads it)."""
    stride: tuple[int, int]
    sites: Mapping[int, SiteGeometry]


DimRule = Callable[[DimEnv], int]

_SITE_DIM = re.compile(r"^([NKR])(\d+)$")
_LEVEL_DIM = re.compile(r"^([HW])(\d+)$")


def num_mergeable(grid: tuple[int, int], stride: tuple[int, int] = (2, 2)) -> int:
    """The largest r the matching can give on a grid: #src, or 0 where no full cell gives a dst."""
    return num_src(grid, stride) if num_dst(grid, stride) else 0


def _site_dim(kind: str, site: SiteGeometry, env: DimEnv) -> int:
    grid = site.grid(env.height, env.width)
    n = grid[0] * grid[1]
    if kind == "N":
        return n
    most = num_mergeable(grid, env.stride)
    if env.corner == "min":
        # R's smallest value is 1 (r = 0 is one self-merge); K's smallest is #dst (every src merged), and
        # at least 1 (a grid without dst merges nothing and keeps N tokens). Both are non-decreasing in h, w.
        return 1 if kind == "R" else max(1, n - num_src(grid, env.stride))
    if env.corner == "max":
        return max(1, most) if kind == "R" else n
    r = int(round(env.merge_fraction * most))
    return max(1, r) if kind == "R" else n - r


def resolve_dim(dim: str | int, env: DimEnv, extra: Mapping[str, DimRule] | None = None) -> int:
    """Concrete value of one (static or symbolic) dim at a profile corner."""
    if is_int(dim):
        return dim
    if not isinstance(dim, str):
        raise CatomeError(f"dim {dim!r} is neither an int nor a symbolic name: the stage specs are damaged, "
                          "rebuild the engine folder")
    if extra and dim in extra:
        return int(extra[dim](env))
    if dim == "B":
        return env.batch
    if dim == "H":
        return env.height
    if dim == "W":
        return env.width
    if dim == "L":
        return env.text_len
    m = _SITE_DIM.match(dim)
    if m:
        k = int(m.group(2))
        if k not in env.sites:
            raise CatomeError(f"dim {dim!r} names merge site {k}, which the model does not have "
                              f"(sites {sorted(env.sites)}): the stage specs do not match the sites, rebuild")
        return _site_dim(m.group(1), env.sites[k], env)
    m = _LEVEL_DIM.match(dim)
    if m and int(m.group(2)) in (1, 2, 4, 8, 16, 32, 64):
        d = int(m.group(2))
        base = env.height if m.group(1) == "H" else env.width
        return -(-base // d)
    raise CatomeError(f"cannot size symbolic dim {dim!r} for a TensorRT profile: known dims are B, H, W, L, "
                      "H2/W2/H4/W4/H8/W8, N{k}, K{k}, R{k}; pass a rule for it (extra_dims)")


def _spec_sites(specs: Sequence[StageSpec]) -> dict[int, SiteGeometry]:
    """Sites named by the specs' symbolic dims, at downsample 1 (when no manifest gives their geometry)."""
    found: set[int] = set()
    for spec in specs:
        for t in (*spec.inputs, *spec.outputs):
            for d in t.shape:
                m = _SITE_DIM.match(d) if isinstance(d, str) else None
                if m:
                    found.add(int(m.group(2)))
    return {k: SiteGeometry(k, 1) for k in sorted(found)}


def compute_profiles(
    manifest_or_specs: Manifest | Sequence[StageSpec],
    shapes: Mapping[str, Any] | ShapeRanges | None = None,
    opt_merge_fraction: float | None = None,
    *,
    sites: Sequence[SiteLike] | None = None,
    stride: tuple[int, int] | None = None,
    extra_dims: Mapping[str, DimRule] | None = None,
) -> list[StageProfile]:
    """Min / opt / max shape of every input of every stage, in stage order.

    ``manifest_or_specs``: a Manifest (its stage specs, sites, stride and
    shapes are used) or a list of StageSpec. ``shapes``: the shape ranges
    (a ShapeRanges, or the manifest's ``shapes`` dict); taken from the
    manifest when None. ``opt_merge_fraction``: expected merged share of
    the src tokens for the opt corner; defaults to the ranges' opt merge
    fraction, then :data:`DEFAULT_OPT_MERGE_FRACTION`. ``sites``: MergeSite
    or SiteGeometry objects; defaults to the manifest's sites (or
    downsample 1 for every site the specs name). ``stride``: the dst cell
    size; defaults to the manifest's merge settings, then (2, 2).
    """
    if isinstance(manifest_or_specs, (list, tuple)):
        specs, manifest = list(manifest_or_specs), None
    else:
        manifest = manifest_or_specs
        specs = manifest.stage_specs()
    if shapes is None:
        if manifest is None:
            raise CatomeError("compute_profiles needs the shape ranges (the manifest's 'shapes' section)")
        shapes = manifest.shapes
    ranges = shapes if isinstance(shapes, ShapeRanges) else ShapeRanges.from_dict(shapes)

    fraction = opt_merge_fraction if opt_merge_fraction is not None else ranges.opt_merge_fraction
    if fraction is None:
        fraction = DEFAULT_OPT_MERGE_FRACTION
        logger.info("no opt merge fraction given: TensorRT profiles tune for %.2f of src tokens merged", fraction)
    check_float("--opt-merge-fraction", fraction, 0.0, 1.0)

    if sites is None and manifest is not None:
        sites = manifest.sites
    geometry = {s.index: SiteGeometry(s.index, s.downsample) for s in sites or ()} or _spec_sites(specs)
    if stride is None:
        stride = manifest.merge.stride if manifest is not None else (2, 2)
    stride = (int(stride[0]), int(stride[1]))

    envs = {
        "min": DimEnv("min", ranges.batch[0], ranges.latent_height[0], ranges.latent_width[0],
                      ranges.text_len[0], 0.0, stride, geometry),
        "opt": DimEnv("opt", ranges.opt_batch, ranges.opt_height, ranges.opt_width,
                      ranges.opt_text_len, float(fraction), stride, geometry),
        "max": DimEnv("max", ranges.batch[1], ranges.latent_height[1], ranges.latent_width[1],
                      ranges.text_len[1], 1.0, stride, geometry),
    }
    profiles: list[StageProfile] = []
    for spec in specs:
        profile: StageProfile = {}
        for t in spec.inputs:
            corners = tuple(tuple(resolve_dim(d, envs[c], extra_dims) for d in t.shape) for c in CORNERS)
            check_ordered(t.name, corners)  # type: ignore[arg-type]
            profile[t.name] = corners  # type: ignore[assignment]
        profiles.append(profile)
    return profiles


def check_ordered(name: str, shapes: ProfileShapes) -> None:
    """Raise CatomeError unless min <= opt <= max in every dim (TensorRT's rule) and no dim is below 1.

    A dim of 0 would let an empty tensor reach an engine, which this
    project never feeds (r = 0 is a self-merge with one src row).
    """
    mn, opt, mx = shapes
    if not len(mn) == len(opt) == len(mx):
        raise CatomeError(f"profile of {name!r}: min/opt/max ranks differ ({mn}, {opt}, {mx})")
    for i, (a, b, c) in enumerate(zip(mn, opt, mx)):
        if a < 1:
            raise CatomeError(f"profile of {name!r}: dim {i} has min {a}; every dim must be at least 1 (no empty "
                              "tensor may reach an engine): check the shape ranges and any extra dim rules")
        if not a <= b <= c:
            raise CatomeError(f"profile of {name!r}: dim {i} has min {a}, opt {b}, max {c}; TensorRT needs "
                              "min <= opt <= max: check the shape ranges and the opt values")


def profiles_to_json(profiles: Sequence[StageProfile]) -> list[dict[str, dict[str, list[int]]]]:
    """The profiles as JSON-ready dicts: ``[{input: {"min": [...], "opt": [...], "max": [...]}}]``."""
    return [{name: {c: list(s) for c, s in zip(CORNERS, shp)} for name, shp in p.items()} for p in profiles]


def profiles_from_json(data: Sequence[Mapping[str, Mapping[str, Sequence[int]]]]) -> list[StageProfile]:
    """Inverse of :func:`profiles_to_json`."""
    out: list[StageProfile] = []
    for stage in data:
        out.append({name: tuple(tuple(int(v) for v in d[c]) for c in CORNERS)  # type: ignore[misc]
                    for name, d in stage.items()})
    return out


# -- calibration ---------------------------------------------------------------------------------------------------

def calibrate_opt_fraction(
    unet: Any,
    settings: Any,
    latent: Any,
    steps: int = 8,
    *,
    encoder_hidden_states: Any = None,
    seed: int = 0,
) -> float:
    """Median merged share r / #src over the sites and steps of a short eager CA-ToMe run.

    Patches ``unet`` with eager CA-ToMe (``settings``: threshold, schedule,
    stride...; the patch is removed afterwards), runs ``steps`` DDIM steps
    from ``latent`` [B, 4, H, W] (use a smooth latent, see
    :func:`catome_export.latents.make_latents`: with random weights white noise merges almost
    nothing), and returns the median of r / #src over every (site, step):
    the shape TensorRT should tune for. ``encoder_hidden_states`` defaults
    to seeded noise of the model's text width. Returns a number in [0, 1].
    """
    import torch
    from diffusers import DDIMScheduler

    from catome_export.eager import apply_merging
    from catome_export.models import find_merge_sites
    from catome_export.models.conditioning import random_added_conditioning

    check_int("calibration steps", steps, 1)
    if getattr(latent, "ndim", None) != 4:
        raise CatomeError(f"calibration latent must be [B, 4, H, W], got shape {tuple(getattr(latent, 'shape', ()))}")
    b, _, lh, lw = latent.shape
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    if encoder_hidden_states is None:
        gen = torch.Generator().manual_seed(seed)
        dim = int(unet.config.cross_attention_dim)
        encoder_hidden_states = torch.randn(b, DEFAULT_TEXT_LEN, dim, generator=gen)
    ehs = encoder_hidden_states.to(device=device, dtype=dtype)
    added = random_added_conditioning(unet, b, (lh * 8, lw * 8), seed=seed, device=device, dtype=dtype)
    extra = {} if added is None else {"added_cond_kwargs": added}  # SDXL-style U-Nets
    src_count = {s.index: num_src(s.grid((lh, lw)), settings.stride)
                 for s in find_merge_sites(unet, settings.max_downsample)}

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    sample = latent.to(device=device, dtype=dtype)
    with apply_merging(unet, settings) as handle, torch.no_grad():
        handle.reset()
        for t in scheduler.timesteps:
            noise = unet(sample, t, encoder_hidden_states=ehs, return_dict=False, **extra)[0]
            sample = scheduler.step(noise, t, sample).prev_sample
        history = list(handle.history)
    shares = [r / src_count[site] for stats in history for site, r in stats.merged.items() if src_count.get(site)]
    if not shares:
        return 0.0
    share = float(statistics.median(shares))
    logger.info("calibration: median merged share %.3f over %d site-steps", share, len(shares))
    return min(1.0, max(0.0, share))
