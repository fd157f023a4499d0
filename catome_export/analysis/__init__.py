"""Schedule analysis: pair drift between denoising steps, optimal checkpoint lists, ``auto:K`` schedules.

- :mod:`~catome_export.analysis.pairs`: pair sets of a merge, Jaccard distance.
- :mod:`~catome_export.analysis.tracking`: a seeded denoising loop that matches every site at every step.
- :mod:`~catome_export.analysis.schedule_search`: the exact least-drift checkpoint list (dynamic programming).
- :mod:`~catome_export.analysis.result`: :class:`PairAnalysis`, scores of schedules.
- :mod:`~catome_export.analysis.calibrate`: ``auto:K`` (:func:`calibrate_schedule`, :func:`resolve_schedule`).
- :mod:`~catome_export.analysis.plot`: the Figure-4-like plot (matplotlib, imported lazily).
"""

from catome_export.analysis.calibrate import (
    calibrate_schedule,
    is_auto_schedule,
    parse_auto_spec,
    resolve_schedule,
)
from catome_export.analysis.pairs import distance_matrix, jaccard_distance, map_distance, pair_map, pair_sets
from catome_export.analysis.result import DEFAULT_BUDGET, PairAnalysis, ScheduleScore, analyze_pairs
from catome_export.analysis.schedule_search import SearchResult, optimal_checkpoints, schedule_drift
from catome_export.analysis.tracking import PairTrace, TrackingConfig, track_pairs

__all__ = [
    "calibrate_schedule", "resolve_schedule", "parse_auto_spec", "is_auto_schedule",
    "jaccard_distance", "pair_map", "pair_sets", "map_distance", "distance_matrix",
    "PairAnalysis", "ScheduleScore", "analyze_pairs", "DEFAULT_BUDGET",
    "SearchResult", "optimal_checkpoints", "schedule_drift",
    "PairTrace", "TrackingConfig", "track_pairs",
]
