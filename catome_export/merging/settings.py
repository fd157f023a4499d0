"""Merge settings: one frozen dataclass for the API, the CLI and the manifest."""

from __future__ import annotations

from typing import Any
from dataclasses import asdict, dataclass, field

from catome_export.checks import check_float, is_int
from catome_export.choices import MergeMode
from catome_export.defaults import (
    DEFAULT_MAX_DOWNSAMPLE, DEFAULT_MERGE_SEED, DEFAULT_R_MULTIPLE, DEFAULT_SCHEDULE, DEFAULT_STRIDE, DEFAULT_THRESHOLD,
)
from catome_export.errors import CatomeError
from catome_export.merging.matching import check_r_multiple
from catome_export.merging.schedules import Schedule, parse_schedule


@dataclass(frozen=True)
class MergeSettings:
    """How tokens are merged. Exactly one of threshold, ratio and merge_fraction is set."""

    threshold: float | None = DEFAULT_THRESHOLD
    """CA-ToMe adaptive threshold t in [-1, 1]: r = max over the batch of #(node_max >= t); t >= 1 merges nothing."""
    ratio: float | None = None
    """ToMe fixed ratio in [0, 1): r = min(int(N * ratio), #src)."""
    merge_fraction: float | None = None
    """Forced r = round(fraction * #src) in [0, 1], for speed measurements independent of weights."""
    schedule: Schedule = field(default_factory=lambda: parse_schedule(DEFAULT_SCHEDULE))
    """Checkpoint steps at which matching is recomputed (cached plans reused in between)."""
    max_downsample: int = DEFAULT_MAX_DOWNSAMPLE
    """Merge in transformer blocks whose level is downsampled by at most this factor."""
    stride: tuple[int, int] = DEFAULT_STRIDE
    """(sy, sx) cell size of the dst grid."""
    random_dst: bool = False
    """Random dst per cell (tomesd) instead of the top-left token (paper)."""
    seed: int = DEFAULT_MERGE_SEED
    """Seed of the random-dst generator (reseeded at every reset)."""
    merge_crossattn: bool = False
    """Also merge around cross-attention (attn2)."""
    merge_mlp: bool = False
    """Also merge around the feed-forward block."""
    r_multiple: int = DEFAULT_R_MULTIPLE
    """Bounded shape variety: each site's r (whatever the mode) is rounded down to a multiple q of this, merging
    the q * floor(r / q) best-scoring src tokens, so a site of N tokens sees at most about N / q distinct shapes
    (TensorRT kernels and CUDA graphs reused, fewer buffer sizes in ONNX Runtime's CPU arena). 1 (default): off,
    r as counted."""

    def __post_init__(self) -> None:
        modes = [v is not None for v in (self.threshold, self.ratio, self.merge_fraction)]
        if sum(modes) != 1:
            raise CatomeError("set exactly one of threshold (CA-ToMe), ratio (ToMe) or merge_fraction")
        for name, lo, hi, hi_open in (("threshold", -1.0, 1.0, False), ("ratio", 0.0, 1.0, True),
                                      ("merge_fraction", 0.0, 1.0, False)):
            v = getattr(self, name)
            if v is not None:
                check_float(name, v, lo, hi, hi_open=hi_open)
        if not isinstance(self.schedule, Schedule):
            raise CatomeError("schedule must be a Schedule (use parse_schedule)")
        if isinstance(self.max_downsample, bool) or self.max_downsample not in (1, 2, 4, 8):
            raise CatomeError(f"max_downsample must be 1, 2, 4 or 8, got {self.max_downsample!r}")
        st = tuple(self.stride)
        if len(st) != 2 or any(not is_int(s) or s < 1 for s in st) or st == (1, 1):
            raise CatomeError(f"stride must be two positive ints (not 1x1), got {self.stride!r}")
        object.__setattr__(self, "stride", st)
        check_r_multiple(self.r_multiple)

    @property
    def mode(self) -> MergeMode:
        if self.threshold is not None:
            return MergeMode.THRESHOLD
        return MergeMode.RATIO if self.ratio is not None else MergeMode.FRACTION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schedule"] = self.schedule.to_dict()
        d["stride"] = list(self.stride)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MergeSettings":
        d = dict(data)
        d["schedule"] = Schedule.from_dict(d["schedule"])
        d["stride"] = tuple(d.get("stride", (2, 2)))
        d.setdefault("r_multiple", DEFAULT_R_MULTIPLE)  # manifests written before r_multiple existed: off
        return cls(**d)
