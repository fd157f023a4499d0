"""``verify_engine``: an engine against eager CA-ToMe on the same weights, step by step.

Both sides run the same schedule of U-Net calls on the same inputs: seeded
smooth latents (blurred noise, so a random-weight model really merges) and
seeded text embeddings, advanced between steps by a DDIM step taken on the
EAGER side's prediction. Feeding both sides the eager latents at every step
keeps errors from compounding, so each step's difference is that step's own.

Two questions are kept apart:

- Outputs, on the same plans. The engine runs first; wherever one of its
  sites matches, its plan is handed to eager CA-ToMe for that site and step
  (``CatomeHandle.set_matcher``), so both sides merge exactly the same tokens
  and the noise predictions must agree within ``tolerance * max(1,
  max|eager|)`` (absolute for outputs of unit scale, relative above). The
  matched flags must agree everywhere (both sides apply the same cache rules).
- Plan agreement. At each site that matches, eager also matches on its own
  block input, and that plan is compared with the engine's in token space
  (:mod:`catome_export.merging.neartie`). The two inputs differ by float
  rounding, so a near-tie (two dst, or a token at the threshold or at the
  r-th place, within the scores' provable error) may fall differently: such a
  flip is reported, not failed. A difference no near-tie explains fails and is
  named by site, step and token. r may differ where near-ties at the threshold
  explain it, or within ``merge_tolerance`` of the site's tokens.

An engine built with ``--controlnet`` gets seeded ControlNet residuals at
every step (new ones each step, the same on both sides, as
``down_block_additional_residuals`` / ``mid_block_additional_residual``), so
the additions inside the engine are compared with diffusers' own.

Default tolerances: 1e-4 for fp32 engines, 2e-2 for fp16 (see docs/runtime.md).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from catome_export.backends.select import choose_backend
from catome_export.backends.torch_backend import load_reference_unet
from catome_export.eager import apply_deepcache, apply_merging
from catome_export.featurecache import FeatureCacheSettings
from catome_export.devices import load_average
from catome_export.checks import check_float, check_int, is_int
from catome_export.errors import CatomeError
from catome_export.export.controlnet import random_residuals
from catome_export.engine.manifest import Manifest
from catome_export.engine.engine import Engine, EngineSource
from catome_export.memory import check_available, gb, verify_need
from catome_export.latents import make_latents
from catome_export.merging import parse_schedule
from catome_export.merging.plan import MergePlan
from catome_export.models.conditioning import random_added_conditioning
from catome_export.models.pipeline import make_scheduler
from catome_export.runtime.runtime import Runtime

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
"""Per-precision limit factor of the max abs diff (times max(1, output scale))."""
DEFAULT_MERGE_TOLERANCE = {"fp32": 0.0, "fp16": 0.01}
"""Per-precision allowed |r_engine - r_eager| at a site, as a fraction of its tokens."""


MAX_DIFFERENCES_PER_STEP = 8
"""Plan differences kept in detail per step (all are counted)."""
SIDE_NAMES = ("the engine", "eager")
"""How the plan comparison names the two sides."""


@dataclass(frozen=True)
class PlanDifference:
    """A token whose merge differs between the engine's plan and eager's own (or differing r)."""

    site: int
    step: int
    batch: int
    """Batch item (-1 for an r difference)."""
    token: int
    """Token index in the site's sequence (-1 for an r difference)."""
    kind: str
    """``dst``, ``merged_a_only`` (engine only), ``merged_b_only`` (eager only), ``r``, ``not_src``,
    ``not_dst``, ``partition`` (see :mod:`catome_export.merging.neartie`)."""
    explained: bool
    """True when a near-tie within the provable error explains it."""
    gap: float
    bound: float
    detail: str

    def describe(self) -> str:
        where = f"site {self.site}, step {self.step}"
        if self.token >= 0:
            where += f", batch item {self.batch}, token {self.token}"
        return f"{where}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "step": self.step, "batch": self.batch, "token": self.token, "kind": self.kind,
                "explained": self.explained, "gap": self.gap, "bound": self.bound, "detail": self.detail}


@dataclass(frozen=True)
class VerifyRow:
    """One U-Net call on both sides."""

    step: int
    timestep: float
    max_abs_diff: float
    """max |engine - eager| of the noise prediction."""
    scale: float
    """max |eager| of the noise prediction."""
    limit: float
    """tolerance * max(1, scale)."""
    merged_engine: dict[int, int] = field(default_factory=dict)
    """Site -> r the engine used."""
    merged_eager: dict[int, int] = field(default_factory=dict)
    """Site -> r of eager's own matching where the site matched, else of the (shared) plan it reused."""
    matched_engine: dict[int, bool] = field(default_factory=dict)
    matched_eager: dict[int, bool] = field(default_factory=dict)
    engine_ms: float = 0.0
    eager_ms: float = 0.0
    r_slack: dict[int, int] = field(default_factory=dict)
    """Site index -> allowed |r_engine - r_eager| (0 everywhere for fp32 engines)."""
    r_near_tie: frozenset[int] = frozenset()
    """Sites whose r differs from eager's own by what near-ties at the threshold explain."""
    plan_flips: dict[int, int] = field(default_factory=dict)
    """Site -> tokens whose merge differs from eager's own plan by an explained near-tie."""
    plan_unexplained: dict[int, int] = field(default_factory=dict)
    """Site -> tokens whose merge differs from eager's own plan beyond any near-tie."""
    plan_differences: tuple[PlanDifference, ...] = ()
    """The differences in detail, unexplained first (at most MAX_DIFFERENCES_PER_STEP per step)."""
    cached_engine: bool = False
    """The engine ran this call from its feature cache (only the shallow branch)."""
    cached_eager: bool = False
    """Eager (the DeepCache-semantics patch) ran this call from its feature cache."""

    @property
    def same_call_kind(self) -> bool:
        """Both sides ran this call in full, or both from the feature cache."""
        return self.cached_engine == self.cached_eager

    @property
    def within_tolerance(self) -> bool:
        return self.max_abs_diff <= self.limit  # NaN compares False: a NaN output fails

    @property
    def same_merging(self) -> bool:
        """Matched flags equal, and r equal at every site (up to the site's slack, or by an explained near-tie)."""
        if self.matched_engine != self.matched_eager or set(self.merged_engine) != set(self.merged_eager):
            return False
        return all(abs(r - self.merged_eager[k]) <= self.r_slack.get(k, 0) or k in self.r_near_tie
                   for k, r in self.merged_engine.items())

    @property
    def plans_explained(self) -> bool:
        """Every difference from eager's own plans is a near-tie."""
        return not any(self.plan_unexplained.values())

    @property
    def flips(self) -> int:
        """Tokens flipped by near-ties at this step, all sites."""
        return sum(self.plan_flips.values())

    @property
    def ok(self) -> bool:
        return self.within_tolerance and self.same_merging and self.plans_explained and self.same_call_kind

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "timestep": self.timestep, "max_abs_diff": self.max_abs_diff, "scale": self.scale,
                "limit": self.limit, "merged_engine": _keys_str(self.merged_engine),
                "merged_eager": _keys_str(self.merged_eager), "matched_engine": _keys_str(self.matched_engine),
                "matched_eager": _keys_str(self.matched_eager), "engine_ms": self.engine_ms,
                "eager_ms": self.eager_ms, "r_slack": _keys_str(self.r_slack),
                "r_near_tie": sorted(self.r_near_tie), "plan_flips": _keys_str(self.plan_flips),
                "plan_unexplained": _keys_str(self.plan_unexplained),
                "plan_differences": [d.to_dict() for d in self.plan_differences],
                "cached_engine": self.cached_engine, "cached_eager": self.cached_eager, "ok": self.ok}


def _keys_str(d: Mapping[int, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in sorted(d.items())}


@dataclass(frozen=True)
class VerifyReport:
    """Everything ``verify_engine`` measured; ``ok`` is the verdict."""

    engine_dir: str
    backend: str
    precision: str
    batch: int
    latent_hw: tuple[int, int]
    schedule: str
    tolerance: float
    rows: tuple[VerifyRow, ...]
    merge_tolerance: float = 0.0
    """Allowed |r_engine - r_eager| per site as a fraction of its tokens."""
    load_avg: float | None = None
    """Highest 1-minute load average seen while timing (None where the platform has none)."""
    cpus: int | None = None
    """Logical CPUs of the machine (``os.cpu_count()``)."""
    r_multiple: int = 1
    """Both sides rounded r down to a multiple of this (``MergeSettings.r_multiple``; 1: off)."""
    controlnet_inputs: int = 0
    """ControlNet residual inputs fed seeded values at every step (0: an engine built without ``--controlnet``)."""

    @property
    def busy(self) -> bool:
        """True when the load average exceeded the CPU count while timing: the latency figures are unreliable."""
        return self.load_avg is not None and self.cpus is not None and self.load_avg > self.cpus

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def max_diff(self) -> float:
        return max((r.max_abs_diff for r in self.rows), default=float("nan"))

    @property
    def failed_steps(self) -> list[int]:
        """Steps above the limit."""
        return [r.step for r in self.rows if not r.within_tolerance]

    @property
    def merge_mismatch_steps(self) -> list[int]:
        """Steps where r or the matched flags differ between engine and eager."""
        return [r.step for r in self.rows if not r.same_merging]

    @property
    def flip_steps(self) -> list[int]:
        """Steps where near-ties flipped tokens between the engine's plans and eager's own."""
        return [r.step for r in self.rows if r.flips]

    @property
    def flipped_tokens(self) -> int:
        return sum(r.flips for r in self.rows)

    @property
    def plan_failure_steps(self) -> list[int]:
        """Steps where a plan differs from eager's own beyond a near-tie."""
        return [r.step for r in self.rows if not r.plans_explained]

    @property
    def unexplained(self) -> list[PlanDifference]:
        """Every detailed plan difference no near-tie explains, in step order."""
        return [d for r in self.rows for d in r.plan_differences if not d.explained]

    @property
    def engine_ms(self) -> float:
        """Median engine time per step (the first step, which warms up, included in the median's sample)."""
        return statistics.median(r.engine_ms for r in self.rows) if self.rows else float("nan")

    @property
    def eager_ms(self) -> float:
        """Median eager CA-ToMe time per step."""
        return statistics.median(r.eager_ms for r in self.rows) if self.rows else float("nan")

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.engine_ms if self.engine_ms > 0 else float("nan")

    def latency_line(self) -> str:
        """What the parity run measured, said as what it is: the engine against the eager CA-ToMe reference
        (which also matches on its own for the comparison), not against plain eager PyTorch; plus a warning when
        the machine was busy."""
        line = (f"latency per step (median): engine {self.engine_ms:.1f} ms vs eager CA-ToMe reference "
                f"{self.eager_ms:.1f} ms ({self.speedup:.2f}x) [{self.backend}, {self.precision}, batch {self.batch}, "
                f"{self.latent_hw[0] * 8}x{self.latent_hw[1] * 8} px]; the reference also runs its own matching for "
                "the comparison, so this is no speedup over plain PyTorch: catome-export bench measures that")
        if self.busy:
            line += (f"\nwarning: the machine was busy while timing (load average {self.load_avg:.1f} on "
                     f"{self.cpus} CPUs): these latencies are unreliable")
        return line

    def summary(self) -> str:
        """One line: verdict, worst difference, merging agreement, latency."""
        verdict = "OK" if self.ok else "FAILED"
        parts = [f"verify {verdict}: {len(self.rows)} steps, max |diff| {self.max_diff:.3g} "
                 f"(tolerance {self.tolerance:g} x max(1, |eager|))"]
        if self.r_multiple != 1:
            parts.append(f"r rounded down to multiples of {self.r_multiple} on both sides")
        if self.failed_steps:
            parts.append(f"above the limit at steps {_short(self.failed_steps)}")
        if self.plan_failure_steps:
            first = [d for d in self.unexplained if d.token >= 0] or self.unexplained
            parts.append(f"plans differ from eager's own beyond a near-tie at steps {_short(self.plan_failure_steps)}"
                         + (f", first at {first[0].describe()}" if first else ""))
        kind = [r.step for r in self.rows if not r.same_call_kind]
        if kind:
            parts.append(f"full and feature-cached calls differ from eager at steps {_short(kind)}")
        cached = [r.step for r in self.rows if r.cached_engine]
        if cached:
            parts.append(f"{len(cached)} of {len(self.rows)} calls ran from the feature cache")
        if self.merge_mismatch_steps:
            parts.append(f"r or matching differ from eager at steps {_short(self.merge_mismatch_steps)}")
        elif self.rows and all(r.merged_engine == r.merged_eager for r in self.rows):
            parts.append("r per site equal at every step")
        elif self.rows:
            slack = " or within the merge tolerance" if any(v for r in self.rows for v in r.r_slack.values()) else ""
            parts.append(f"r per site equal or differing by near-ties{slack} at every step")
        if self.controlnet_inputs:
            parts.append(f"{self.controlnet_inputs} ControlNet residual inputs fed seeded values at every step")
        if self.flip_steps:
            parts.append(f"near-tie flips ({self.flipped_tokens} tokens) at steps {_short(self.flip_steps)}")
        elif self.rows and not self.plan_failure_steps:
            parts.append("plans equal to eager's own at every match")
        return "; ".join(parts) + "\n" + self.latency_line()

    def format_table(self) -> str:
        """A compact per-step table: diff, limit, r per site (``*`` = matched at this step), time."""
        sites = sorted({k for r in self.rows for k in (*r.merged_engine, *r.merged_eager)})
        head = (f"{'step':>4} {'t':>6} {'max|diff|':>9} {'limit':>8}  "
                + " ".join(f"{'r' + str(k):>11}" for k in sites) + f" {'eng ms':>8} {'eag ms':>8}  ok")
        lines = [head]
        for r in self.rows:
            cells = []
            for k in sites:
                mine, theirs = r.merged_engine.get(k), r.merged_eager.get(k)
                if mine is None and theirs is None:
                    cells.append(f"{'-':>11}")  # the site did not run (a feature-cached call)
                    continue
                cell = f"{mine}{'*' if r.matched_engine.get(k) else ''}"
                if r.plan_flips.get(k):
                    cell += f"~{r.plan_flips[k]}"
                if r.plan_unexplained.get(k):
                    cell += "?"
                if mine != theirs or r.matched_engine.get(k) != r.matched_eager.get(k):
                    cell += f"!{theirs}{'*' if r.matched_eager.get(k) else ''}"
                cells.append(f"{cell:>11}")
            kind = ("c" if r.cached_engine else " ") + ("" if r.same_call_kind else "!")
            lines.append(f"{r.step:>4}{kind:<2}{r.timestep:>5.0f} {r.max_abs_diff:>9.2e} {r.limit:>8.1e}  "
                         + " ".join(cells) + f" {r.engine_ms:>8.1f} {r.eager_ms:>8.1f}  {'ok' if r.ok else 'FAIL'}")
        lines.append("r = tokens merged per site (engine); * = matched at this step; ~n = n tokens flipped by "
                     "near-ties against eager's own plan; ? = a plan difference no near-tie explains; "
                     "!x = eager's own r (x) differs; c = a feature-cached call (shallow branch only; a site that "
                     "did not run shows no r); c! = eager's call kind differs")
        return "\n".join(lines)

    def format_differences(self, limit: int = 20) -> str:
        """The plan differences in words, unexplained ones first (empty when the plans agree everywhere)."""
        diffs = sorted((d for r in self.rows for d in r.plan_differences), key=lambda d: (d.explained, d.step))
        lines = [("near-tie: " if d.explained else "NOT a near-tie: ") + d.describe() for d in diffs[:limit]]
        if len(diffs) > limit:
            lines.append(f"... and {len(diffs) - limit} more (see the JSON report)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"engine_dir": self.engine_dir, "backend": self.backend, "precision": self.precision,
                "batch": self.batch, "latent_hw": list(self.latent_hw), "schedule": self.schedule,
                "tolerance": self.tolerance, "merge_tolerance": self.merge_tolerance, "r_multiple": self.r_multiple,
                "ok": self.ok,
                "max_diff": self.max_diff, "flip_steps": self.flip_steps, "flipped_tokens": self.flipped_tokens,
                "plan_failure_steps": self.plan_failure_steps, "controlnet_inputs": self.controlnet_inputs,
                "engine_ms": self.engine_ms, "eager_ms": self.eager_ms,
                "timing": {"compares": "engine vs eager CA-ToMe reference (with its own matching)",
                           "load_avg_max": self.load_avg, "cpus": self.cpus, "busy": self.busy},
                "rows": [r.to_dict() for r in self.rows]}


def _short(steps: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    n = len(steps)
    return f"[{shown}{', ...' if n > limit else ''}] ({n} step{'' if n == 1 else 's'})"


def _latent_hw(resolution: Any, default: tuple[int, int]) -> tuple[int, int]:
    if resolution is None:
        return default
    if is_int(resolution):
        px = (resolution, resolution)
    elif isinstance(resolution, (tuple, list)) and len(resolution) == 2:
        px = tuple(resolution)
    else:
        raise CatomeError(f"resolution must be pixels N or (height, width), got {resolution!r}")
    if any(not is_int(p) or p <= 0 or p % 8 for p in px):
        raise CatomeError(f"resolution {resolution!r}: pixel sizes must be positive multiples of 8")
    return px[0] // 8, px[1] // 8


def _default_shape(manifest: Manifest) -> tuple[int, tuple[int, int]]:
    """(batch, latent hw) to verify at: the build's opt shape."""
    s = manifest.shapes
    return s.opt_batch, (s.opt_height, s.opt_width)


def _text_shape(manifest: Manifest) -> tuple[int, int]:
    s = manifest.shapes
    if s.text_dim is None:
        raise CatomeError("the manifest has no text_dim: rebuild the engine with catome-export build")
    return s.opt_text_len, s.text_dim


@dataclass(frozen=True)
class _SiteMatch:
    """What one side matched at one site on one step."""

    x: torch.Tensor
    """The block input the site matched on."""
    own: MergePlan
    """The plan this side's own matching gave."""
    src_ids: torch.Tensor
    dst_ids: torch.Tensor


class _MatchRecorder:
    """A controller matcher: matches as usual and records input, partition and plan per site.

    With ``given`` set (the engine's matches of this step), the site then uses
    the given plan instead of its own: the eager reference on the engine's plans.
    """

    def __init__(self, controller: Any) -> None:
        self.controller = controller
        self.seen: dict[int, _SiteMatch] = {}
        self.given: Mapping[int, _SiteMatch] | None = None

    def start_step(self, given: Mapping[int, _SiteMatch] | None = None) -> None:
        self.seen = {}
        self.given = given

    def __call__(self, site: int, x: torch.Tensor, grid: tuple[int, int]) -> MergePlan:
        src_ids, dst_ids = self.controller.partition_for(x, grid)
        own: MergePlan = self.controller.compute_plan(x, grid)
        self.seen[site] = _SiteMatch(x.detach().clone(), own, src_ids, dst_ids)
        theirs = self.given.get(site) if self.given is not None else None
        if theirs is None:  # not given (the engine did not match here): the matched flags will differ
            return own
        return theirs.own.to(x.device)


def _compare_site(site: int, step: int, engine: _SiteMatch, eager: _SiteMatch, threshold: float | None,
                  device_type: str, r_multiple: int = 1) -> tuple[Any, list[PlanDifference]]:
    """The engine's plan against eager's own at one site and step: (PlanComparison or None, differences)."""
    from catome_export.merging.neartie import compare_plans, unit_roundoff

    if not (torch.equal(engine.src_ids.cpu(), eager.src_ids.cpu())
            and torch.equal(engine.dst_ids.cpu(), eager.dst_ids.cpu())):
        return None, [PlanDifference(site, step, -1, -1, "partition", False, float("nan"), float("nan"),
                                     "the engine and eager matched on different src/dst partitions")]
    roundoff = max(unit_roundoff(engine.x.dtype, device_type), unit_roundoff(eager.x.dtype, device_type))
    result = compare_plans(engine.x, engine.own, eager.x, eager.own, eager.src_ids, eager.dst_ids,
                           threshold=threshold, roundoff=roundoff, names=SIDE_NAMES, multiple=r_multiple)
    diffs = [PlanDifference(site, step, d.batch, d.token, d.kind, d.explained, d.gap, d.bound, d.detail)
             for d in result.differences]
    return result, diffs


def _within_slack(diff: PlanDifference, slack: int) -> PlanDifference:
    """An r difference within the merge tolerance counts as accepted (fp16); anything else is as it was."""
    if diff.kind != "r" or diff.explained or abs(diff.gap) > slack:
        return diff
    return replace(diff, explained=True, detail=f"{diff.detail}; within the merge tolerance ({slack} tokens)")


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out, (time.perf_counter() - start) * 1e3


def verify_engine(engine: EngineSource, steps: int = 50, schedule: Any = None, backend: str = "auto", seed: int = 0,
                  batch: int | None = None, resolution: Any = None, tolerance: float | None = None, *,
                  merge_tolerance: float | None = None, device: torch.device | str | None = None,
                  backend_options: Mapping[str, Any] | None = None,
                  progress: Callable[[VerifyRow], None] | None = None,
                  feature_cache: FeatureCacheSettings | None | str = "engine",
                  r_multiple: int | None = None) -> VerifyReport:
    """Run ``engine`` (an :class:`~catome_export.engine.engine.Engine`, or its folder, opened and checked here,
    once) and eager CA-ToMe side by side over ``steps`` U-Net calls and compare them.

    ``schedule`` overrides the manifest's checkpoint schedule (a name or a
    list; the manifest's step_base is kept). ``batch`` / ``resolution``
    (pixels, N or (h, w)) default to the build's opt shape. ``tolerance``
    defaults to 1e-4 (fp32) or 2e-2 (fp16); the limit at each step is
    ``tolerance * max(1, max|eager output|)``. ``merge_tolerance``: allowed
    |r_engine - r_eager| per site as a fraction of its tokens (default 0 for
    fp32, 0.01 for fp16), accepted besides what near-ties explain.

    Eager runs on the engine's plans wherever a site matches, so the outputs
    are compared on the same plans; eager's own plan at that site and step is
    compared with the engine's separately (near-tie flips are reported in the
    rows, other differences fail the step). Raises CatomeError when the eager
    model's weights differ from the ones the engine was built from.

    ``feature_cache``: DeepCache-style caching on both sides (settings, None
    for off, ``"engine"`` (default) for the build's own): the engine's
    shorter walks against eager with :func:`catome_export.eager.apply_deepcache`,
    call by call; a call that is full on one side and cached on the other
    fails its step.

    ``r_multiple``: round r down to a multiple of this on both sides instead
    of the manifest's ``merge.r_multiple`` (None: the manifest's; 1 for
    engines built before the setting existed).
    """

    check_int("steps", steps, 1)
    check_int("seed", seed)
    if tolerance is not None:
        check_float("tolerance", tolerance, 0, finite=False)
    if merge_tolerance is not None:
        check_float("merge tolerance", merge_tolerance, 0, 1, hint="a fraction of the merged tokens")
    opened = Engine.open(engine)
    engine_dir, manifest = opened.path, opened.manifest
    settings = manifest.merge
    if schedule is not None:
        settings = replace(settings, schedule=parse_schedule(schedule, settings.schedule.step_base))
    if r_multiple is not None:
        settings = replace(settings, r_multiple=r_multiple)
    default_batch, default_hw = _default_shape(manifest)
    if batch is not None:
        check_int("batch", batch, 1)
    batch = default_batch if batch is None else batch
    latent_hw = _latent_hw(resolution, default_hw)
    manifest.check_shapes(batch, latent_hw[0], latent_hw[1])
    precision = manifest.precision
    tol = float(DEFAULT_TOLERANCE.get(precision, 1e-4) if tolerance is None else tolerance)
    r_tol = float(DEFAULT_MERGE_TOLERANCE.get(precision, 0.0) if merge_tolerance is None else merge_tolerance)
    text_len, text_dim = _text_shape(manifest)
    if choose_backend(backend, engine_backend=manifest.engine_backend, device=device).name == "ort-cpu":
        weights = sum(s.total_bytes for s in manifest.stages)
        check_available(verify_need(weights), f"verifying {engine_dir} on the CPU (the eager U-Net and the engine in "
                        f"ONNX Runtime at once, {gb(weights)} of weights each)",
                        "verify on a machine with more memory (or on a GPU), or close other programs")

    runtime = Runtime.load(opened, backend=backend, device=device, settings=settings,
                           backend_options=backend_options, feature_cache=feature_cache)
    handle = None
    cache_handle = None
    try:
        dev, dtype = runtime.device, runtime.dtype
        eager_unet = load_reference_unet(manifest, dev)
        handle = apply_merging(eager_unet, settings)
        scheduler = make_scheduler("ddim")
        scheduler.set_timesteps(steps)
        if runtime.feature_cache is not None:
            runtime.set_timesteps(scheduler.timesteps)
            cache_handle = apply_deepcache(eager_unet, settings=runtime.feature_cache, timesteps=scheduler.timesteps)
        gen = torch.Generator().manual_seed(seed + 1)
        ehs = torch.randn(batch, text_len, text_dim, generator=gen).to(device=dev, dtype=dtype)
        added = random_added_conditioning(eager_unet, batch, (latent_hw[0] * 8, latent_hw[1] * 8), seed=seed + 2,
                                          device=dev, dtype=dtype)
        extra = {} if added is None else {"added_cond_kwargs": added}  # SDXL-style: the same for both
        latents = (make_latents((batch, runtime.unet.in_channels, *latent_hw), "smooth", seed)
                   * scheduler.init_noise_sigma).to(device=dev, dtype=dtype)
        timer = _Timer(dev)
        slack = {}
        for merge_site in runtime.sites.values():
            gh, gw = merge_site.grid(latent_hw)
            slack[merge_site.index] = int(r_tol * gh * gw)
        runtime.reset()
        handle.reset()
        engine_matches = _MatchRecorder(runtime.controller)
        eager_matches = _MatchRecorder(handle.controller)
        runtime.controller.set_matcher(engine_matches)
        handle.set_matcher(eager_matches)
        threshold = settings.threshold if settings.mode == "threshold" else None
        rows: list[VerifyRow] = []
        loads: list[float] = []
        logger.info("verifying %s on %s over %d steps (batch %d, latent %dx%d, %s%s)", engine_dir, runtime.backend.name, steps, batch, latent_hw[0], latent_hw[1], settings.schedule.describe(),
                    "" if runtime.feature_cache is None else f", {runtime.feature_cache.describe()}")
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                runtime.set_step(i)
                handle.set_step(i)
                if cache_handle is not None:
                    cache_handle.set_step(i)
                model_in = scheduler.scale_model_input(latents, t)
                call: dict[str, Any] = dict(extra)
                if runtime.controlnet is not None:  # new seeded residuals at every step, the same for both
                    down, mid = random_residuals(runtime.controlnet, batch, latent_hw, seed=seed + 3 + i, dtype=dtype,
                                                 device=dev)
                    call.update(down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)
                engine_matches.start_step()
                got, engine_ms = timer(lambda: runtime.unet(model_in, t, encoder_hidden_states=ehs, **call).sample)
                eager_matches.start_step(given=engine_matches.seen)  # eager runs on the engine's plans
                want, eager_ms = timer(lambda: eager_unet(model_in, t, encoder_hidden_states=ehs, **call).sample)
                diff = float((got.float() - want.float()).abs().max())
                scale = float(want.float().abs().max())
                mine, theirs = runtime.history[-1], handle.history[-1]
                merged_eager = dict(theirs.merged)
                flips: dict[int, int] = {}
                unexplained: dict[int, int] = {}
                near_tie_r: set[int] = set()
                found: list[PlanDifference] = []
                for site in sorted(set(engine_matches.seen) & set(eager_matches.seen)):
                    own = eager_matches.seen[site]
                    merged_eager[site] = own.own.num_merged
                    result, diffs = _compare_site(site, i, engine_matches.seen[site], own, threshold, dev.type,
                                                  settings.r_multiple)
                    diffs = [_within_slack(d, slack.get(site, 0)) for d in diffs]
                    token_diffs = [d for d in diffs if d.kind != "r"]
                    flips[site] = sum(d.explained for d in token_diffs)
                    unexplained[site] = sum(not d.explained for d in token_diffs)
                    if result is not None and result.merged_a != result.merged_b and result.r_explained:
                        near_tie_r.add(site)
                    found.extend(diffs)
                found.sort(key=lambda d: (d.explained, d.site))
                row = VerifyRow(step=i, timestep=float(t), max_abs_diff=diff, scale=scale,
                                limit=tol * max(1.0, scale), merged_engine=dict(mine.merged),
                                merged_eager=merged_eager, matched_engine=dict(mine.matched),
                                matched_eager=dict(theirs.matched), engine_ms=engine_ms, eager_ms=eager_ms,
                                r_slack=slack, r_near_tie=frozenset(near_tie_r),
                                plan_flips={k: v for k, v in flips.items() if v},
                                plan_unexplained={k: v for k, v in unexplained.items() if v},
                                plan_differences=tuple(found[:MAX_DIFFERENCES_PER_STEP]),
                                cached_engine=mine.cached_features,
                                cached_eager=cache_handle is not None and not cache_handle.history[-1].full)
                rows.append(row)
                load = load_average()
                if load is not None:
                    loads.append(load)
                logger.debug("step %d: max|diff| %.3g, r %s, near-tie flips %s", i, diff, row.merged_engine,
                             row.plan_flips)
                if progress is not None:
                    progress(row)
                latents = scheduler.step(want, t, latents).prev_sample
        return VerifyReport(engine_dir=str(engine_dir), backend=runtime.backend.name,
                            precision=precision, batch=batch, latent_hw=latent_hw,
                            schedule=settings.schedule.describe() + ("" if runtime.feature_cache is None else
                                                                     f", {runtime.feature_cache.describe()}"),
                            tolerance=tol, rows=tuple(rows),
                            merge_tolerance=r_tol, load_avg=max(loads) if loads else None,
                            cpus=os.cpu_count(), r_multiple=settings.r_multiple,
                            controlnet_inputs=0 if runtime.controlnet is None else len(runtime.controlnet.names))
    finally:
        runtime.controller.set_matcher(None)
        if cache_handle is not None:
            cache_handle.remove()
        if handle is not None:
            handle.remove()
        runtime.close()


def write_report_json(report: VerifyReport, path: str | Path) -> None:
    """Write ``report.to_dict()`` as JSON (atomically: temp file + rename)."""
    from catome_export.fsutil import atomic_write_json

    try:
        atomic_write_json(path, report.to_dict())
    except OSError as exc:
        raise CatomeError(f"cannot write the report to {path}: {exc.strerror or exc}") from None
