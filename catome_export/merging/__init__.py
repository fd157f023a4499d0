"""Pure tensor functions: matching, merge plans, schedules (no diffusers, ONNX or TensorRT)."""

from catome_export.merging.matching import count_merged, forced_plan, grid_for_tokens, match_tokens, partition
from catome_export.merging.plan import PLAN_TENSORS, MergePlan, merge_tokens, unmerge_tokens
from catome_export.merging.schedules import (
    NAMED_SCHEDULES, AutoSchedule, Schedule, ScheduleRequest, parse_schedule, parse_schedule_request,
)
from catome_export.merging.steps import StepCounter, StepRecord

__all__ = [
    "MergePlan", "PLAN_TENSORS", "match_tokens", "merge_tokens", "unmerge_tokens", "partition", "count_merged",
    "forced_plan", "grid_for_tokens", "Schedule", "parse_schedule", "NAMED_SCHEDULES", "StepCounter", "StepRecord",
    "AutoSchedule", "ScheduleRequest", "parse_schedule_request",
]
from catome_export.merging.controller import MergeController
from catome_export.merging.settings import MergeSettings

__all__ += ["MergeController", "MergeSettings"]
