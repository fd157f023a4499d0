"""``auto:K`` schedules: K checkpoints calibrated on the model itself.

:func:`calibrate_schedule` tracks the pairs of every merge site over one
seeded generation of the (unpatched) U-Net and returns the K checkpoints with
the least pair drift (see :mod:`catome_export.analysis.schedule_search`).
:func:`resolve_schedule` is what ``apply_catome`` and ``build`` call with the
user's schedule spec: ordinary specs go to :func:`parse_schedule`, ``auto:K``
is calibrated.

Start latents: ``latents="auto"`` starts from plain noise, as a pipeline does;
where that gives (almost) no pairs, as with random weights, it runs again from
smooth latents, which make the drift measurable (and logs that it did).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from catome_export.checks import check_int
from catome_export.analysis.result import PairAnalysis, analyze_pairs
from catome_export.analysis.tracking import TrackingConfig
from catome_export.errors import CatomeError
from catome_export.defaults import DEFAULT_THRESHOLD
from catome_export.merging.schedules import (
    AUTO_PREFIX, AutoSchedule, Schedule, ScheduleSpec, parse_auto_spec, parse_schedule,
)

logger = logging.getLogger(__name__)

CALIBRATION_OPTIONS = frozenset({
    "steps", "threshold", "ratio", "latent_hw", "seed", "latents", "scheduler", "guidance_scale",
    "max_downsample", "stride", "text_embeddings",
})
"""Keyword arguments :func:`resolve_schedule` passes on to :func:`calibrate_schedule`."""

MIN_MERGED_FRACTION = 0.01
"""Below this fraction of merged tokens, ``latents="auto"`` retries with smooth latents."""


def is_auto_schedule(spec: object) -> bool:
    """Whether ``spec`` asks for a calibrated schedule (``auto:K``, or an :class:`AutoSchedule`)."""
    return isinstance(spec, AutoSchedule) or (isinstance(spec, str) and spec.strip().lower().startswith(AUTO_PREFIX))


def check_budget(k: object, steps: int) -> int:
    """K as an int in [1, steps], or a CatomeError saying what to give."""
    k = check_int("the checkpoint count K of auto:K", k)
    if not 1 <= k <= steps:
        raise CatomeError(
            f"auto:{k} asks for {k} checkpoints in {steps} steps: K must be from 1 to {steps} "
            "(K = steps recomputes at every step; use every_step for that)"
        )
    return k


def calibration_analysis(
    unet: torch.nn.Module,
    *,
    steps: int = 50,
    threshold: float | None = DEFAULT_THRESHOLD,
    ratio: float | None = None,
    latent_hw: tuple[int, int] | None = None,
    seed: int = 0,
    latents: str = "auto",
    scheduler: str = "pndm",
    guidance_scale: float = 7.5,
    max_downsample: int | None = None,
    stride: tuple[int, int] = (2, 2),
    text_embeddings: torch.Tensor | None = None,
) -> PairAnalysis:
    """The pair analysis a calibration runs (see :func:`calibrate_schedule` for the arguments)."""
    if latents not in ("auto", "noise", "smooth"):
        raise CatomeError(f"latents must be auto, noise or smooth, got {latents!r}")
    if threshold is None and ratio is None:
        raise CatomeError("auto:K calibration matches with a threshold (CA-ToMe) or a ratio (ToMe): give one; "
                          "a forced merge fraction has no pairs to calibrate on")
    embs = None if text_embeddings is None else [text_embeddings]

    def run(kind: str) -> PairAnalysis:
        config = TrackingConfig(steps=steps, threshold=threshold, ratio=ratio, latent_hw=latent_hw, seed=seed,
                                latents=kind, scheduler=scheduler, guidance_scale=guidance_scale,
                                max_downsample=max_downsample, stride=tuple(stride))
        return analyze_pairs(unet, config, embs)

    analysis = run("noise" if latents == "auto" else latents)
    if latents == "auto" and analysis.merged_fraction < MIN_MERGED_FRACTION:
        logger.info(
            "calibration: noise latents merged %.2f%% of tokens (random weights?); calibrating on smooth latents",
            100 * analysis.merged_fraction,
        )
        analysis = run("smooth")
    return analysis


def calibrate_schedule(
    unet: torch.nn.Module,
    k: int,
    *,
    steps: int = 50,
    threshold: float | None = DEFAULT_THRESHOLD,
    ratio: float | None = None,
    step_base: int = 1,
    latent_hw: tuple[int, int] | None = None,
    seed: int = 0,
    latents: str = "auto",
    scheduler: str = "pndm",
    guidance_scale: float = 7.5,
    max_downsample: int | None = None,
    stride: tuple[int, int] = (2, 2),
    text_embeddings: torch.Tensor | None = None,
) -> Schedule:
    """The schedule ``auto:K``: K checkpoints with the least pair drift on this U-Net.

    Runs one seeded generation of ``steps`` inference steps (PLMS by default,
    as the paper; classifier-free guidance, batch 2) on the *unpatched* U-Net,
    matching every merge site at every call with ``threshold`` (or ``ratio``),
    and picks the exact drift optimum with the first step among the
    checkpoints. The result is numbered with ``step_base``: with 1 (the
    authors' numbering) the first loop index is step 1, so the list holds
    loop index + 1. ``text_embeddings`` [2, L, D] (uncond, cond) replace the
    seeded random ones where a text encoder is at hand. The U-Net is left as
    it was. Deterministic for a given U-Net and arguments.
    """
    k = check_budget(k, steps)
    if step_base not in (0, 1) or isinstance(step_base, bool):
        raise CatomeError(f"step_base must be 0 (paper numbering) or 1 (authors' code), got {step_base!r}")
    analysis = calibration_analysis(
        unet, steps=steps, threshold=threshold, ratio=ratio, latent_hw=latent_hw, seed=seed, latents=latents,
        scheduler=scheduler, guidance_scale=guidance_scale, max_downsample=max_downsample, stride=stride,
        text_embeddings=text_embeddings,
    )
    score = analysis.propose(k, step_base)
    schedule = Schedule(f"{AUTO_PREFIX}{k}", score.checkpoints, step_base)
    logger.info("calibrated schedule %s (pair drift %.3f per step and site)", schedule.describe(), score.mean_drift)
    return schedule


def resolve_schedule(
    spec: ScheduleSpec | AutoSchedule,
    unet: torch.nn.Module | None = None,
    step_base: int = 1,
    **calib: Any,
) -> Schedule:
    """A :class:`Schedule` from any spec: ``parse_schedule`` for ordinary ones, calibration for ``auto:K``.

    ``calib`` goes to :func:`calibrate_schedule` (steps, threshold, ratio,
    latent_hw, seed, latents, scheduler, guidance_scale, max_downsample,
    stride, text_embeddings) and is ignored for ordinary specs.
    """
    k = parse_auto_spec(spec)
    if k is None:
        return parse_schedule(spec, step_base)
    unknown = sorted(set(calib) - CALIBRATION_OPTIONS)
    if unknown:
        raise CatomeError(
            f"unknown calibration option(s) {', '.join(unknown)}: use {', '.join(sorted(CALIBRATION_OPTIONS))}"
        )
    if unet is None:
        raise CatomeError(f"schedule {spec!r} is calibrated on the model: pass the U-Net to calibrate on")
    return calibrate_schedule(unet, k, step_base=step_base, **calib)
