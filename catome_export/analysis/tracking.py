"""Pair tracking: match every merge site at every step of a small denoising loop.

The U-Net runs unmodified (no merging, no cache). A forward pre-hook on the
``BasicTransformerBlock`` of each merge site sees the block input x (the
metric, before norm1), runs :func:`match_tokens` on it and keeps the pairs as
a pair map (see :mod:`catome_export.analysis.pairs`). The hooks are removed
when the run ends, whatever happens.

The loop is deliberately plain and deterministic: seeded start latents, a
diffusers scheduler configured like SD 1.5 (PLMS = ``PNDMScheduler`` with
``skip_prk_steps``, or DDIM), classifier-free guidance with batch 2
(uncond + cond embeddings in one U-Net call, as pipelines do).
"""

from __future__ import annotations

import logging
from typing import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from catome_export.checks import check_float, check_int
from catome_export.latents import LATENT_KINDS, make_latents
from catome_export.analysis.pairs import NOT_MERGED, consecutive_distances, distance_matrix, pair_map
from catome_export.defaults import DEFAULT_THRESHOLD
from catome_export.errors import CatomeError
from catome_export.merging.matching import match_tokens
from catome_export.models.conditioning import random_added_conditioning
from catome_export.models.sites import MergeSite, default_merge_level, find_merge_sites

logger = logging.getLogger(__name__)

SCHEDULERS = ("pndm", "ddim")
"""Schedulers of the tracking loop: PLMS (as the paper's results) or DDIM."""

SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
}
"""Scheduler settings of SD 1.5's pipeline."""


@dataclass(frozen=True)
class TrackingConfig:
    """How the pair-tracking loop runs and matches."""

    steps: int = 50
    """Number of inference steps (PLMS makes steps + 1 U-Net calls, DDIM makes steps)."""
    threshold: float | None = DEFAULT_THRESHOLD
    """CA-ToMe threshold of the matching (exactly one of threshold and ratio)."""
    ratio: float | None = None
    """ToMe fixed ratio of the matching, instead of a threshold."""
    latent_hw: tuple[int, int] | None = None
    """Latent height and width; None = the U-Net's ``sample_size``."""
    seed: int = 0
    """Seed of the start latents (and of random text embeddings)."""
    latents: str = "smooth"
    """Start latents: ``smooth`` (blurred seeded noise) or ``noise``."""
    scheduler: str = "pndm"
    """``pndm`` (PLMS, skip_prk_steps) or ``ddim``."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale."""
    max_downsample: int | None = None
    """Merge sites: transformer blocks at downsample <= this factor; None = the U-Net's own merge level
    (1 for SD 1.x/2.x, 2 for SDXL: its highest-resolution transformer blocks)."""
    stride: tuple[int, int] = (2, 2)
    """(sy, sx) cell size of the dst grid (dst = top-left token of each cell)."""

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1)
        if (self.threshold is None) == (self.ratio is None):
            raise CatomeError("give exactly one of threshold (CA-ToMe) or ratio (ToMe) for the matching")
        if self.threshold is not None:
            check_float("threshold", self.threshold, -1.0, 1.0)
        if self.ratio is not None:
            check_float("ratio", self.ratio, 0.0, 1.0, hi_open=True)
        check_float("guidance_scale", self.guidance_scale)
        check_int("seed", self.seed, 0)
        if self.latents not in LATENT_KINDS:
            raise CatomeError(f"latents must be one of {', '.join(LATENT_KINDS)}, got {self.latents!r}")
        if self.scheduler not in SCHEDULERS:
            raise CatomeError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.latent_hw is not None:
            hw = tuple(int(v) for v in self.latent_hw)
            if len(hw) != 2 or min(hw) < 1:
                raise CatomeError(f"latent size must be two ints >= 1, got {self.latent_hw!r}")
            object.__setattr__(self, "latent_hw", hw)
        object.__setattr__(self, "stride", tuple(self.stride))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latent_hw"] = list(self.latent_hw) if self.latent_hw is not None else None
        d["stride"] = list(self.stride)
        return d


@dataclass
class PairTrace:
    """The pairs of every site at every U-Net call of one tracking run."""

    sites: list[MergeSite]
    grids: list[tuple[int, int]]
    timesteps: list[int]
    """Scheduler timestep of each U-Net call (PLMS repeats one)."""
    maps: list[torch.Tensor] = field(default_factory=list)
    """Per site: pair maps [T, B, N] int (dst token of each merged src, -1 otherwise), on the CPU."""
    merged: np.ndarray | None = None
    """[T, S] int: r of each site at each call."""

    @property
    def num_calls(self) -> int:
        return len(self.timesteps)

    def distances(self) -> np.ndarray:
        """[S, T, T]: Jaccard distance between the pairs of any two calls, per site (mean over batch)."""
        return np.stack([distance_matrix(m) for m in self.maps])

    def consecutive(self) -> np.ndarray:
        """[T, S]: distance to the previous call's pairs (NaN at call 0)."""
        return np.stack([consecutive_distances(m) for m in self.maps], axis=1)


def make_scheduler(kind: str, steps: int):
    """A diffusers scheduler configured like SD 1.5's pipeline, with ``steps`` inference steps set."""
    from diffusers import DDIMScheduler, PNDMScheduler

    if kind == "pndm":
        sched = PNDMScheduler(skip_prk_steps=True, **SD15_SCHEDULER_CONFIG)
    elif kind == "ddim":
        sched = DDIMScheduler(clip_sample=False, **SD15_SCHEDULER_CONFIG)
    else:
        raise CatomeError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {kind!r}")
    sched.set_timesteps(steps)
    return sched


def default_latent_hw(unet: torch.nn.Module) -> tuple[int, int]:
    """The U-Net's native latent size (config ``sample_size``)."""
    size = getattr(getattr(unet, "config", None), "sample_size", None)
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[1])
    if size is None:
        raise CatomeError("the U-Net config has no sample_size: give the latent size explicitly")
    return int(size), int(size)


class _SiteTracker:
    """Forward pre-hook state: matches a site's block input at every call."""

    def __init__(self, site: MergeSite, grid: tuple[int, int], config: TrackingConfig) -> None:
        self.site = site
        self.grid = grid
        self.config = config
        self.maps: list[torch.Tensor] = []
        self.merged: list[int] = []

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise CatomeError(f"merge site {self.site.path}: expected a [B, N, C] block input, got {type(x).__name__}")
        if not bool(torch.isfinite(x).all()):
            raise CatomeError(
                f"merge site {self.site.path}: the block input is not finite at call {len(self.maps)}; "
                "lower the guidance scale or use fewer steps"
            )
        plan = match_tokens(x, self.grid, threshold=self.config.threshold, ratio=self.config.ratio,
                            stride=self.config.stride)
        pm = pair_map(plan)
        self.maps.append(pm.to("cpu", torch.int32))
        self.merged.append(plan.num_merged)


def _sample_of(output: object) -> torch.Tensor:
    sample = getattr(output, "sample", None)
    if sample is None and isinstance(output, (tuple, list)):
        sample = output[0]
    if not isinstance(sample, torch.Tensor):
        raise CatomeError("the U-Net returned no sample tensor")
    return sample


def track_pairs(unet: torch.nn.Module, config: TrackingConfig, text_embeddings: torch.Tensor,
                on_step: Callable[[int, int], None] | None = None) -> PairTrace:
    """Run the denoising loop once and record every site's pairs at every U-Net call.

    ``text_embeddings`` is [2, L, D]: row 0 unconditional, row 1 conditional
    (one generation with classifier-free guidance, batch 2 per U-Net call).
    The U-Net is left as it was (hooks removed, no parameter touched). ``on_step(i, n)`` is called after
    U-Net call i of n (progress).
    """
    if text_embeddings.ndim != 3 or text_embeddings.shape[0] != 2:
        raise CatomeError(f"text embeddings must be [2, L, D] (uncond, cond), got {tuple(text_embeddings.shape)}")
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    latent_hw = config.latent_hw or default_latent_hw(unet)
    level = default_merge_level(unet) if config.max_downsample is None else config.max_downsample
    sites = find_merge_sites(unet, level)
    grids = [site.grid(latent_hw) for site in sites]
    modules = dict(unet.named_modules())
    trackers = [_SiteTracker(site, grid, config) for site, grid in zip(sites, grids)]
    in_channels = int(getattr(unet.config, "in_channels", 4))

    sched = make_scheduler(config.scheduler, config.steps)
    latents = make_latents((1, in_channels, *latent_hw), config.latents, config.seed, device=device,
                           dtype=torch.float32) * float(sched.init_noise_sigma)
    emb = text_embeddings.to(device=device, dtype=dtype)
    added = random_added_conditioning(unet, 2, (latent_hw[0] * 8, latent_hw[1] * 8), seed=config.seed,
                                      device=device, dtype=dtype)
    extra = {} if added is None else {"added_cond_kwargs": added}
    timesteps = [int(t) for t in sched.timesteps]
    logger.debug("tracking pairs: %d U-Net calls, latent %dx%d, %s latents, %d sites",
                 len(timesteps), *latent_hw, config.latents, len(sites))
    handles = [modules[site.path].register_forward_pre_hook(tr, with_kwargs=True)
               for site, tr in zip(sites, trackers)]
    try:
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                model_in = sched.scale_model_input(torch.cat([latents, latents]), t)
                out = unet(model_in.to(dtype), t, encoder_hidden_states=emb, **extra)
                noise_uncond, noise_cond = _sample_of(out).float().chunk(2)
                noise = noise_uncond + config.guidance_scale * (noise_cond - noise_uncond)
                latents = sched.step(noise, t, latents).prev_sample
                if on_step is not None:
                    on_step(i, len(timesteps))
    finally:
        for h in handles:
            h.remove()
    for tr in trackers:
        if len(tr.maps) != len(timesteps):
            raise CatomeError(
                f"merge site {tr.site.path} ran {len(tr.maps)} times in {len(timesteps)} U-Net calls: "
                "the model does not call each transformer block once per step"
            )
    return PairTrace(
        sites=sites,
        grids=grids,
        timesteps=timesteps,
        maps=[torch.stack(tr.maps) for tr in trackers],
        merged=np.array([tr.merged for tr in trackers], dtype=np.int64).T.reshape(len(timesteps), len(sites)),
    )


def merged_fraction(trace: PairTrace) -> float:
    """Fraction of tokens merged, over all sites, calls and batch items."""
    total = sum(int(m.numel()) for m in trace.maps)
    merged = sum(int((m != NOT_MERGED).sum()) for m in trace.maps)
    return merged / total if total else 0.0
