"""The rows of a benchmark: their inputs, their merge settings, and the row dicts of the JSON."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from catome_export.dtypes import precision_dtype
from catome_export.bench.config import MERGING_BACKENDS, BenchConfig
from catome_export.bench.measure import BENCH_SCHEDULE, TIMESTEP, Inputs, RowTiming
from catome_export.merging import MergeSettings, parse_schedule


def model_dtype(config: BenchConfig) -> torch.dtype:
    """The torch dtype of the benchmark's precision."""
    return precision_dtype(config.precision)


def make_inputs(unet_config: Any, resolution: int, config: BenchConfig) -> Inputs:
    """Seeded latents (smooth or noise), a constant timestep and random text embeddings at one resolution.

    SDXL-style U-Nets (``addition_embed_type: text_time``) also get their added conditioning: seeded random
    ``text_embeds`` [B, projection width] and the ``time_ids`` [B, 6] of an uncropped image at ``resolution``
    (original size, crop top-left (0, 0), target size), as ``StableDiffusionXLPipeline`` builds them."""
    from catome_export.latents import make_latents
    from catome_export.models.conditioning import conditioning_for_config

    cfg = dict(unet_config)
    lat = resolution // 8
    device = torch.device(config.device)
    dtype = model_dtype(config)
    sample = make_latents((config.batch, int(cfg["in_channels"]), lat, lat), config.latents, config.seed,
                          device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(config.seed + 1)
    text = torch.randn(config.batch, config.text_len, int(cfg["cross_attention_dim"]), generator=gen)
    timestep = torch.full((config.batch,), TIMESTEP, dtype=torch.float32, device=device)
    added = conditioning_for_config(cfg, config.batch, (resolution, resolution), seed=config.seed + 2,
                                    device=device, dtype=dtype)
    return Inputs(sample, timestep, text.to(device=device, dtype=dtype), added)


def settings_for(backend: str, base: MergeSettings, fraction: float | None, threshold: float | None,
                  loop_schedule: str | None = None) -> MergeSettings | None:
    """Merge settings of a row: forced fraction or threshold; ToMe matches at every step."""
    if backend not in MERGING_BACKENDS:
        return None
    if backend == "eager-tome":
        schedule = parse_schedule("every_step")
    elif loop_schedule is not None:
        schedule = parse_schedule(loop_schedule)
    else:
        schedule = BENCH_SCHEDULE
    if fraction is not None:
        return replace(base, threshold=None, ratio=None, merge_fraction=float(fraction), schedule=schedule)
    return replace(base, threshold=float(threshold), ratio=None, merge_fraction=None, schedule=schedule)  # type: ignore[arg-type]


def row_settings(config: BenchConfig, backend: str) -> list[tuple[float | None, float | None]]:
    """(fraction, threshold) pairs of a backend's rows."""
    if backend not in MERGING_BACKENDS:
        return [(0.0, None)]
    pairs: list[tuple[float | None, float | None]] = [(f, None) for f in config.merge_fractions]
    if config.threshold is not None:
        pairs.append((None, config.threshold))
    return pairs


def build_row(backend: str, resolution: int, inputs: Inputs, fraction: float | None, threshold: float | None,
              timing: RowTiming, grids: list[tuple[int, int]], stride: tuple[int, int], backend_detail: str,
              r_multiple: int = 1) -> dict:
    """The JSON row of one timing: latencies, r per site, controller shares, stage times.

    ``merge_fraction`` is the requested fraction, or the realised one where r was rounded to a multiple of
    ``r_multiple`` > 1 (or came from a threshold)."""
    cached = timing.cached.summary
    assert cached is not None
    num_src = {i: h * w - (h // stride[0]) * (w // stride[1]) for i, (h, w) in enumerate(grids)}
    merged = {int(k): int(v) for k, v in sorted(timing.merged.items())}
    realised = (sum(merged.values()) / sum(num_src[k] for k in merged)) if merged else 0.0
    row: dict[str, Any] = {
        "backend": backend, "runs_on": backend_detail, "resolution": resolution,
        "latent": list(inputs.latent_hw), "batch": inputs.batch,
        "merge_fraction": round(realised if fraction is None or r_multiple != 1 else fraction, 4),
        "requested_merge_fraction": fraction, "threshold": threshold,
        "merged": {str(k): v for k, v in merged.items()},
        **cached.to_dict(), "repeats": cached.count,
    }
    ck = timing.checkpoint.summary
    row.update({"checkpoint_median_ms": round(ck.median_ms, 3) if ck else None,
                "checkpoint_min_ms": round(ck.min_ms, 3) if ck else None,
                "checkpoint_repeats": ck.count if ck else 0,
                # every timed call, in the order the rounds ran them: the raw data behind the summaries
                "samples_ms": [round(ms, 3) for ms in timing.cached.step_ms],
                "checkpoint_samples_ms": [round(ms, 3) for ms in timing.checkpoint.step_ms]})
    ctrl_cached = timing.cached.controller_ms() if backend in MERGING_BACKENDS else None
    ctrl_ck = timing.checkpoint.controller_ms() if ck else None
    row["controller"] = {
        "cached_ms": None if ctrl_cached is None else round(ctrl_cached, 3),
        "cached_share": None if ctrl_cached is None else round(ctrl_cached / cached.median_ms, 5),
        "checkpoint_ms": None if ctrl_ck is None else round(ctrl_ck, 3),
        "checkpoint_share": None if ctrl_ck is None or not ck else round(ctrl_ck / ck.median_ms, 5),
    }
    outside = timing.cached.outside_stages_ms()
    if outside is not None:
        out_ck = timing.checkpoint.outside_stages_ms()
        row["controller"].update({
            "outside_stages_cached_ms": round(outside, 3),
            "outside_stages_cached_share": round(outside / cached.median_ms, 5),
            "outside_stages_checkpoint_ms": None if out_ck is None else round(out_ck, 3),
            "outside_stages_checkpoint_share": None if out_ck is None or not ck else round(out_ck / ck.median_ms, 5),
        })
    stages = timing.cached.stage_ms()
    if stages is not None:
        row["stage_ms"] = [round(s, 3) for s in stages]
        ck_stages = timing.checkpoint.stage_ms()
        row["checkpoint_stage_ms"] = None if ck_stages is None else [round(s, 3) for s in ck_stages]
    if timing.loop is not None:
        row["loop"] = timing.loop
    return row


def describe(backend: str, resolution: int, batch: int, fraction: float | None, threshold: float | None) -> str:
    """A row's name in progress lines."""
    return f"{backend} {resolution}px batch {batch}" + \
        (f" merge {fraction:g}" if fraction is not None and backend in MERGING_BACKENDS else "") + \
        (f" threshold {threshold:g}" if threshold is not None else "")
