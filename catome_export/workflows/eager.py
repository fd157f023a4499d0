"""``apply_catome``: eager CA-ToMe on a diffusers pipeline or U-Net (``catome_export.apply_catome``).

It lives above :mod:`catome_export.eager` because an ``auto:K`` schedule is
calibrated on the unpatched U-Net first (:mod:`catome_export.analysis.calibrate`,
which itself runs the eager patch); the patching is
:func:`catome_export.eager.apply_merging` with the checked settings.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from catome_export.analysis import calibrate
from catome_export.defaults import (
    DEFAULT_MERGE_SEED, DEFAULT_R_MULTIPLE, DEFAULT_SCHEDULE, DEFAULT_STEP_BASE, DEFAULT_STRIDE, DEFAULT_THRESHOLD,
)
from catome_export.eager.patch import (
    CATOME_DEFAULTS, CatomeHandle, apply_merging, catome_settings, refuse_if_patched, refuse_options_with_settings,
    split_target,
)
from catome_export.merging import AutoSchedule, MergeSettings
from catome_export.merging.schedules import ScheduleSpec, parse_schedule_request

__all__ = ["apply_catome"]


def apply_catome(
    pipe_or_unet: Any,
    threshold: float = DEFAULT_THRESHOLD,
    schedule: ScheduleSpec | AutoSchedule = DEFAULT_SCHEDULE,
    max_downsample: int | None = None,
    step_base: int = DEFAULT_STEP_BASE,
    stride: tuple[int, int] = DEFAULT_STRIDE,
    random_dst: bool = False,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    *,
    seed: int = DEFAULT_MERGE_SEED,
    r_multiple: int = DEFAULT_R_MULTIPLE,
    settings: MergeSettings | None = None,
) -> CatomeHandle:
    """Apply CA-ToMe (adaptive threshold + cached matching) to a pipeline or U-Net.

    ``threshold``: merge every src token whose best cosine similarity is >= t
    (r = max over the batch); 1 merges nothing. ``schedule``: checkpoint steps
    at which matching is recomputed (cached pairs reused in between): a name
    (config1..config4, adaptive, config_five, every_step), a list of step
    numbers, or ``auto:K``: K checkpoints calibrated on the unpatched model
    first, with the same threshold, stride, merge levels and step numbering
    (:mod:`catome_export.analysis.calibrate`). ``step_base`` 1 (default, as the authors' code ran): entry k
    fires at loop index k - 1; 0: at loop index k. ``random_dst`` picks a
    random dst per cell from a generator seeded with ``seed`` at every reset
    (tomesd's behaviour); the default is the top-left token (the paper).
    ``max_downsample``: merge at the transformer blocks of downsample <= this
    factor; None (default) = the U-Net's own merge level, its
    highest-resolution transformer blocks (1 for SD 1.x/2.x, 2 for SDXL, which
    has no attention at the top level). ``r_multiple`` q > 1 rounds each
    site's r down to a multiple of q (the q * floor(r / q) best-scoring src
    merge; bounded shape variety, as an engine with the same setting does).
    Works the same on SD 1.x, SD 2.x and SDXL pipelines and U-Nets.
    Alternatively pass a ready ``settings=MergeSettings(...)`` and no options.
    """
    given = dict(threshold=threshold, schedule=schedule, max_downsample=max_downsample, step_base=step_base,
                 stride=stride, random_dst=random_dst, merge_crossattn=merge_crossattn, merge_mlp=merge_mlp, seed=seed,
                 r_multiple=r_multiple)
    if settings is not None:
        refuse_options_with_settings(given, CATOME_DEFAULTS)
        return apply_merging(pipe_or_unet, settings)
    _, unet = split_target(pipe_or_unet)
    refuse_if_patched(unet)
    # every option is checked before a possibly long auto:K calibration
    checked = catome_settings(unet, threshold, step_base, max_downsample, stride, random_dst, merge_crossattn,
                              merge_mlp, seed, r_multiple)
    request = parse_schedule_request(schedule, checked.schedule.step_base)
    if isinstance(request, AutoSchedule):
        request = calibrate.resolve_schedule(request, unet, checked.schedule.step_base, threshold=checked.threshold,
                                             max_downsample=checked.max_downsample, stride=checked.stride)
    return apply_merging(pipe_or_unet, replace(checked, schedule=request))
