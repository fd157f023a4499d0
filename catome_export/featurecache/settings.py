"""Feature-caching settings: one frozen dataclass for the API, the CLI and the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from catome_export.checks import check_float, check_int, check_ints
from catome_export.errors import CatomeError

DEFAULT_CACHE_INTERVAL = 3
DEFAULT_CACHE_BRANCH = 0


@dataclass(frozen=True)
class FeatureCacheSettings:
    """DeepCache's ``set_params(cache_interval, cache_branch_id)``, or an explicit list of full calls."""

    interval: int = DEFAULT_CACHE_INTERVAL
    """``cache_interval`` I >= 1: every I-th call position (counted from the first call) is full; 1 = no caching."""
    branch: int = DEFAULT_CACHE_BRANCH
    """``cache_branch_id`` b >= 0: the shallow branch that runs on cached calls (block b // 3, layer b % 3)."""
    full_steps: tuple[int, ...] | None = None
    """Instead of ``interval``: the call positions (counted from the first call, as DeepCache counts them)
    that are full; must contain 0, the first call, which fills the cache."""

    def __post_init__(self) -> None:
        check_int("cache interval", self.interval, 1, hint="1 = every call full, no caching")
        check_int("cache branch", self.branch, 0, hint="0 = the shallowest branch")
        if self.full_steps is not None:
            steps = check_ints("full steps", tuple(self.full_steps), 0)
            steps = tuple(sorted(set(steps)))
            if not steps or steps[0] != 0:
                raise CatomeError(f"full steps {list(steps)} must contain 0: the first call of a generation fills "
                                  "the cache, so it must be full")
            object.__setattr__(self, "full_steps", steps)

    @property
    def block(self) -> int:
        """DeepCache's ``cache_block_id``."""
        return self.branch // 3

    @property
    def layer(self) -> int:
        """DeepCache's ``cache_layer_id``."""
        return self.branch % 3

    @property
    def caches(self) -> bool:
        """False when every call is full (interval 1, or a full-step list that cannot skip)."""
        return self.full_steps is not None or self.interval > 1

    def is_full(self, offset: int) -> bool:
        """Whether the call at ``offset`` = position - start is a full call."""
        if self.full_steps is not None:
            return offset in self.full_steps
        return offset % self.interval == 0

    def describe(self) -> str:
        when = (f"full at {list(self.full_steps)}" if self.full_steps is not None
                else f"interval {self.interval}")
        return f"feature cache ({when}, branch {self.branch})"

    def flag(self) -> str:
        """The command-line spelling (``--feature-cache``) that :func:`parse_feature_cache` reads back."""
        if self.full_steps is not None:
            return f"full:{','.join(map(str, self.full_steps))};{self.branch}"
        return f"{self.interval},{self.branch}"

    def to_dict(self) -> dict[str, Any]:
        return {"interval": self.interval, "branch": self.branch,
                "full_steps": None if self.full_steps is None else list(self.full_steps)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureCacheSettings":
        full = data.get("full_steps")
        return cls(interval=int(data.get("interval", DEFAULT_CACHE_INTERVAL)),
                   branch=int(data.get("branch", DEFAULT_CACHE_BRANCH)),
                   full_steps=None if full is None else tuple(int(s) for s in full))


def parse_feature_cache(text: str) -> FeatureCacheSettings | None:
    """``"I,b"`` (DeepCache's interval and branch), ``"I"`` (branch 0), ``"off"`` (None), or
    ``"full:0,3,6,...;b"`` (explicit full call positions, then the branch)."""
    s = str(text).strip().lower()
    if s in ("off", "none", "no", ""):
        return None
    usage = ("give the feature cache as INTERVAL,BRANCH (e.g. 3,0), INTERVAL, off, or full:0,2,5;BRANCH "
             f"(got {text!r})")
    try:
        if s.startswith("full:"):
            body, _, branch = s[5:].partition(";")
            steps = tuple(int(p) for p in body.split(",") if p.strip())
            return FeatureCacheSettings(branch=int(branch) if branch.strip() else DEFAULT_CACHE_BRANCH,
                                        full_steps=steps)
        parts = [p.strip() for p in s.split(",")]
        if len(parts) > 2:
            raise CatomeError(usage)
        interval = int(parts[0])
        branch = int(parts[1]) if len(parts) == 2 else DEFAULT_CACHE_BRANCH
    except ValueError:
        raise CatomeError(usage) from None
    return FeatureCacheSettings(interval=interval, branch=branch)


def nonuniform_full_steps(num_steps: int, interval: int, center: int = 15, power: float = 1.4) -> tuple[int, ...]:
    """DeepCache's non-uniform schedule: ``ceil(num_steps / interval)`` full calls, denser around ``center``.

    The same numbers as ``sample_from_quad_center`` in the DeepCache package's
    own Stable Diffusion pipeline (its ``uniform=False, pow=..., center=...``
    options; the helper class has no working non-uniform mode): the power is
    lowered by 0.02 until the schedule has the wanted number of distinct
    steps. Use the result as ``FeatureCacheSettings(full_steps=...)``.
    """
    import numpy as np

    for name, v, lo in (("num_steps", num_steps, 1), ("interval", interval, 1), ("center", center, 0)):
        check_int(name, v, lo)
    if not 0 <= center <= num_steps:
        raise CatomeError(f"center must be within the {num_steps} steps, got {center}")
    check_float("power", power, 1, lo_open=True)
    if interval == 1:
        return tuple(range(num_steps))
    wanted = -(-num_steps // interval)
    p = float(power)
    while p > 1:
        # (-center) ** (1 / p) is complex in Python, as in DeepCache; its int32 cast keeps the real part
        xs = np.linspace(complex(-center) ** (1 / p), complex(num_steps - center) ** (1 / p), wanted + 1)
        indices = [0] + [int(x) + center for x in np.unique(np.real(xs ** p).astype(np.int32))[1:-1]]
        if len(indices) == wanted:
            return tuple(indices)
        p -= 0.02
    raise CatomeError(f"no non-uniform schedule of {wanted} full steps in {num_steps} around {center}: lower center "
                      "or the interval")
