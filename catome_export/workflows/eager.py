"""``apply_catome`` with calibrated schedules: eager CA-ToMe whose ``auto:K`` schedule is calibrated first.

:func:`catome_export.eager.apply_catome` patches a pipeline with a ready
schedule; this one also takes ``auto:K`` (an :class:`AutoSchedule`), which it
calibrates on the unpatched U-Net with the same threshold, stride, merge
levels and step numbering (:mod:`catome_export.analysis.calibrate`) before
patching. ``catome_export.apply_catome`` is this function.
"""

from __future__ import annotations

from typing import Any

from catome_export import eager
from catome_export.analysis import calibrate
from catome_export.defaults import (
    DEFAULT_MERGE_SEED, DEFAULT_R_MULTIPLE, DEFAULT_SCHEDULE, DEFAULT_STEP_BASE, DEFAULT_STRIDE, DEFAULT_THRESHOLD,
)
from catome_export.eager.patch import CatomeHandle, catome_settings, refuse_if_patched, split_target
from catome_export.merging import AutoSchedule, MergeSettings, parse_schedule_request
from catome_export.merging.schedules import ScheduleSpec


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
    """:func:`catome_export.eager.apply_catome`, with ``auto:K`` schedules calibrated on the model first."""
    options: dict[str, Any] = dict(max_downsample=max_downsample, step_base=step_base, stride=stride,
                                   random_dst=random_dst, merge_crossattn=merge_crossattn, merge_mlp=merge_mlp,
                                   seed=seed, r_multiple=r_multiple, settings=settings)
    if settings is None:
        request = parse_schedule_request(schedule, step_base)
        if isinstance(request, AutoSchedule):
            _, unet = split_target(pipe_or_unet)
            refuse_if_patched(unet)
            checked = catome_settings(unet, threshold, step_base, max_downsample, stride, random_dst,
                                      merge_crossattn, merge_mlp, seed, r_multiple)  # every option checked before calibrating
            schedule = calibrate.resolve_schedule(request, unet, checked.schedule.step_base,
                                                  threshold=checked.threshold, max_downsample=checked.max_downsample,
                                                  stride=checked.stride)
    return eager.apply_catome(pipe_or_unet, threshold, schedule, **options)
