"""``verify_engine``: an engine against eager CA-ToMe on the same weights, step by step.

Both sides run the same schedule of U-Net calls on the same inputs: seeded
smooth latents (blurred noise, so a random-weight model really merges) and
seeded text embeddings, advanced between steps by a DDIM step taken on the
EAGER side's prediction. Feeding both sides the eager latents at every step
keeps errors from compounding, so each step's difference is that step's own.

Per step it compares the noise predictions (max abs diff against a limit of
``tolerance * max(1, max|eager|)``: absolute for outputs of unit scale,
relative above), the merged count r per site, and whether each site matched
or reused its cache. The engine passes when every step is within the limit,
the matched flags agree everywhere, and r agrees at every site (exactly for
fp32; within ``merge_tolerance`` of the site's tokens for fp16, where a
similarity within one half-precision step of the threshold can fall either
way). Default tolerances: 1e-4 for fp32 engines, 2e-2 for fp16 (see
docs/runtime.md).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from catome_export.errors import CatomeError

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
"""Per-precision limit factor of the max abs diff (times max(1, output scale))."""
DEFAULT_MERGE_TOLERANCE = {"fp32": 0.0, "fp16": 0.01}
"""Per-precision allowed |r_engine - r_eager| at a site, as a fraction of its tokens."""


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
    merged_eager: dict[int, int] = field(default_factory=dict)
    matched_engine: dict[int, bool] = field(default_factory=dict)
    matched_eager: dict[int, bool] = field(default_factory=dict)
    engine_ms: float = 0.0
    eager_ms: float = 0.0
    r_slack: dict[int, int] = field(default_factory=dict)
    """Site index -> allowed |r_engine - r_eager| (0 everywhere for fp32 engines)."""

    @property
    def within_tolerance(self) -> bool:
        return self.max_abs_diff <= self.limit  # NaN compares False: a NaN output fails

    @property
    def same_merging(self) -> bool:
        """Matched flags equal, and r equal at every site (up to the site's slack)."""
        if self.matched_engine != self.matched_eager or set(self.merged_engine) != set(self.merged_eager):
            return False
        return all(abs(r - self.merged_eager[k]) <= self.r_slack.get(k, 0) for k, r in self.merged_engine.items())

    @property
    def ok(self) -> bool:
        return self.within_tolerance and self.same_merging

    def to_dict(self) -> dict:
        return {"step": self.step, "timestep": self.timestep, "max_abs_diff": self.max_abs_diff, "scale": self.scale,
                "limit": self.limit, "merged_engine": _keys_str(self.merged_engine),
                "merged_eager": _keys_str(self.merged_eager), "matched_engine": _keys_str(self.matched_engine),
                "matched_eager": _keys_str(self.matched_eager), "engine_ms": self.engine_ms,
                "eager_ms": self.eager_ms, "r_slack": _keys_str(self.r_slack), "ok": self.ok}


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
        return (f"latency per step (median): eager {self.eager_ms:.1f} ms, engine {self.engine_ms:.1f} ms "
                f"({self.speedup:.2f}x) [{self.backend}, {self.precision}, batch {self.batch}, "
                f"{self.latent_hw[0] * 8}x{self.latent_hw[1] * 8} px]")

    def summary(self) -> str:
        """One line: verdict, worst difference, merging agreement, latency."""
        verdict = "OK" if self.ok else "FAILED"
        parts = [f"verify {verdict}: {len(self.rows)} steps, max |diff| {self.max_diff:.3g} "
                 f"(tolerance {self.tolerance:g} x max(1, |eager|))"]
        if self.failed_steps:
            parts.append(f"above the limit at steps {_short(self.failed_steps)}")
        if self.merge_mismatch_steps:
            parts.append(f"r or matching differ from eager at steps {_short(self.merge_mismatch_steps)}")
        elif self.rows and all(r.merged_engine == r.merged_eager for r in self.rows):
            parts.append("r per site equal at every step")
        elif self.rows:
            parts.append(f"r per site within {self.merge_tolerance:g} of the tokens at every step")
        return "; ".join(parts) + "\n" + self.latency_line()

    def format_table(self) -> str:
        """A compact per-step table: diff, limit, r per site (``*`` = matched at this step), time."""
        sites = sorted({k for r in self.rows for k in (*r.merged_engine, *r.merged_eager)})
        head = f"{'step':>4} {'t':>6} {'max|diff|':>9} {'limit':>8}  " + " ".join(f"{'r' + str(k):>7}" for k in sites) \
            + f" {'eng ms':>8} {'eag ms':>8}  ok"
        lines = [head]
        for r in self.rows:
            cells = []
            for k in sites:
                mine, theirs = r.merged_engine.get(k), r.merged_eager.get(k)
                cell = f"{mine}{'*' if r.matched_engine.get(k) else ''}"
                if mine != theirs or r.matched_engine.get(k) != r.matched_eager.get(k):
                    cell += f"!{theirs}{'*' if r.matched_eager.get(k) else ''}"
                cells.append(f"{cell:>7}")
            lines.append(f"{r.step:>4} {r.timestep:>6.0f} {r.max_abs_diff:>9.2e} {r.limit:>8.1e}  " + " ".join(cells)
                         + f" {r.engine_ms:>8.1f} {r.eager_ms:>8.1f}  {'ok' if r.ok else 'FAIL'}")
        lines.append("r = tokens merged per site (engine); * = matched at this step; !x = eager differs (x)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"engine_dir": self.engine_dir, "backend": self.backend, "precision": self.precision,
                "batch": self.batch, "latent_hw": list(self.latent_hw), "schedule": self.schedule,
                "tolerance": self.tolerance, "merge_tolerance": self.merge_tolerance, "ok": self.ok,
                "max_diff": self.max_diff,
                "engine_ms": self.engine_ms, "eager_ms": self.eager_ms, "rows": [r.to_dict() for r in self.rows]}


def _short(steps: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    return f"[{shown}{', ...' if len(steps) > limit else ''}] ({len(steps)})"


def smooth_latents(batch: int, latent_hw: tuple[int, int], seed: int, channels: int = 4, kernel: int = 5,
                   scale: float = 3.0) -> torch.Tensor:
    """Seeded blurred noise [B, C, h, w]: self-similar enough that random-weight models merge at t = 0.7."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, channels, *latent_hw, generator=gen)
    blurred = torch.nn.functional.avg_pool2d(noise, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return blurred * scale


def _latent_hw(resolution: Any, default: tuple[int, int]) -> tuple[int, int]:
    if resolution is None:
        return default
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        px = (resolution, resolution)
    elif isinstance(resolution, (tuple, list)) and len(resolution) == 2:
        px = tuple(resolution)
    else:
        raise CatomeError(f"resolution must be pixels N or (height, width), got {resolution!r}")
    if any(isinstance(p, bool) or not isinstance(p, int) or p <= 0 or p % 8 for p in px):
        raise CatomeError(f"resolution {resolution!r}: pixel sizes must be positive multiples of 8")
    return px[0] // 8, px[1] // 8


def _default_shape(manifest: Any) -> tuple[int, tuple[int, int]]:
    """(batch, latent hw) to verify at: the build's opt shape, else the smallest built shape."""
    shapes = getattr(manifest, "shapes", None) or {}
    opt = shapes.get("opt") or {}

    def pick(key: str, opt_key: str) -> int:
        if opt.get(opt_key):
            return int(opt[opt_key])
        rng = shapes.get(key)
        if isinstance(rng, (list, tuple)) and rng:
            return int(rng[0])
        raise CatomeError(f"the manifest has no {key} range: rebuild the engine with catome-export build")

    return pick("batch", "batch"), (pick("latent_height", "latent_height"), pick("latent_width", "latent_width"))


def _text_shape(manifest: Any) -> tuple[int, int]:
    shapes = getattr(manifest, "shapes", None) or {}
    try:
        return int(shapes["text_len"]), int(shapes["text_dim"])
    except (KeyError, TypeError, ValueError):
        raise CatomeError("the manifest has no text_len/text_dim: rebuild the engine with catome-export build") \
            from None


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


def verify_engine(engine_dir: str | Path, steps: int = 50, schedule: Any = None, backend: str = "auto", seed: int = 0,
                  batch: int | None = None, resolution: Any = None, tolerance: float | None = None, *,
                  merge_tolerance: float | None = None, device: torch.device | str | None = None,
                  backend_options: Mapping[str, Any] | None = None,
                  progress: Callable[[VerifyRow], None] | None = None) -> VerifyReport:
    """Run the engine and eager CA-ToMe side by side over ``steps`` U-Net calls and compare them.

    ``schedule`` overrides the manifest's checkpoint schedule (a name or a
    list; the manifest's step_base is kept). ``batch`` / ``resolution``
    (pixels, N or (h, w)) default to the build's opt shape. ``tolerance``
    defaults to 1e-4 (fp32) or 2e-2 (fp16); the limit at each step is
    ``tolerance * max(1, max|eager output|)``. ``merge_tolerance``: allowed
    |r_engine - r_eager| per site as a fraction of its tokens (default 0 for
    fp32, 0.01 for fp16). Raises CatomeError when the eager model's weights
    differ from the ones the engine was built from.
    """
    from catome_export.backends.torch_backend import load_reference_unet
    from catome_export.eager import apply_merging
    from catome_export.export.manifest import Manifest
    from catome_export.merging import parse_schedule
    from catome_export.models.pipeline import make_scheduler
    from catome_export.runtime.runtime import Runtime

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CatomeError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CatomeError(f"seed must be an int, got {seed!r}")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not tolerance >= 0):
        raise CatomeError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if merge_tolerance is not None and (isinstance(merge_tolerance, bool)
                                        or not isinstance(merge_tolerance, (int, float))
                                        or not 0 <= merge_tolerance <= 1):
        raise CatomeError(f"merge tolerance must be a fraction in [0, 1], got {merge_tolerance!r}")
    engine_dir = Path(engine_dir)
    manifest = Manifest.load(engine_dir)
    settings = manifest.settings()
    if schedule is not None:
        settings = replace(settings, schedule=parse_schedule(schedule, settings.schedule.step_base))
    default_batch, default_hw = _default_shape(manifest)
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise CatomeError(f"batch must be an int >= 1, got {batch!r}")
    batch = default_batch if batch is None else batch
    latent_hw = _latent_hw(resolution, default_hw)
    manifest.check_shapes(batch, latent_hw[0], latent_hw[1])
    precision = str(getattr(manifest, "precision", "fp32"))
    tol = float(DEFAULT_TOLERANCE.get(precision, 1e-4) if tolerance is None else tolerance)
    r_tol = float(DEFAULT_MERGE_TOLERANCE.get(precision, 0.0) if merge_tolerance is None else merge_tolerance)
    text_len, text_dim = _text_shape(manifest)

    runtime = Runtime.load(engine_dir, backend=backend, device=device, settings=settings,
                           backend_options=backend_options)
    handle = None
    try:
        dev, dtype = runtime.device, runtime.dtype
        eager_unet = load_reference_unet(manifest, dev)
        handle = apply_merging(eager_unet, settings)
        scheduler = make_scheduler("ddim")
        scheduler.set_timesteps(steps)
        gen = torch.Generator().manual_seed(seed + 1)
        ehs = torch.randn(batch, text_len, text_dim, generator=gen).to(device=dev, dtype=dtype)
        latents = (smooth_latents(batch, latent_hw, seed, channels=runtime.unet.in_channels)
                   * scheduler.init_noise_sigma).to(device=dev, dtype=dtype)
        timer = _Timer(dev)
        slack = {}
        for site in runtime.sites.values():
            gh, gw = site.grid(latent_hw)
            slack[site.index] = int(r_tol * gh * gw)
        runtime.reset()
        handle.reset()
        rows: list[VerifyRow] = []
        logger.info("verifying %s on %s over %d steps (batch %d, latent %dx%d, %s)", engine_dir, runtime.backend.name
                    if runtime.backend else "?", steps, batch, latent_hw[0], latent_hw[1], settings.schedule.describe())
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                runtime.set_step(i)
                handle.set_step(i)
                model_in = scheduler.scale_model_input(latents, t)
                want, eager_ms = timer(lambda: eager_unet(model_in, t, encoder_hidden_states=ehs).sample)
                got, engine_ms = timer(lambda: runtime.unet(model_in, t, encoder_hidden_states=ehs).sample)
                diff = float((got.float() - want.float()).abs().max())
                scale = float(want.float().abs().max())
                mine, theirs = runtime.last_stats, handle.history[-1]
                row = VerifyRow(step=i, timestep=float(t), max_abs_diff=diff, scale=scale,
                                limit=tol * max(1.0, scale), merged_engine=dict(mine.merged),
                                merged_eager=dict(theirs.merged), matched_engine=dict(mine.matched),
                                matched_eager=dict(theirs.matched), engine_ms=engine_ms, eager_ms=eager_ms,
                                r_slack=slack)
                rows.append(row)
                logger.debug("step %d: max|diff| %.3g, r %s", i, diff, row.merged_engine)
                if progress is not None:
                    progress(row)
                latents = scheduler.step(want, t, latents).prev_sample
        return VerifyReport(engine_dir=str(engine_dir), backend=runtime.backend.name if runtime.backend else "custom",
                            precision=precision, batch=batch, latent_hw=latent_hw,
                            schedule=settings.schedule.describe(), tolerance=tol, rows=tuple(rows),
                            merge_tolerance=r_tol)
    finally:
        if handle is not None:
            handle.remove()
        runtime.close()


def write_report_json(report: VerifyReport, path: str | Path) -> None:
    """Write ``report.to_dict()`` as JSON (atomically: temp file + rename)."""
    from catome_export.export.fsutil import atomic_write_json

    try:
        atomic_write_json(path, report.to_dict())
    except OSError as exc:
        raise CatomeError(f"cannot write the report to {path}: {exc.strerror or exc}") from None
